"""Reflect episodes (self-correction on a task item): each episode's attempts, and the reflections
written between them with their rewards.
"""

from __future__ import annotations

import time
from typing import Any

import sqlite_utils

from selfsteer.trainer_bridge.store.base import StoreBase
from selfsteer.trainer_bridge.store.checks import _flag, _int, _number, _optional_int, _optional_number, _text


class EpisodesMixin(StoreBase):
    def add_episode(
        self,
        task: str,
        task_id: Any = None,
        strategy: str | None = None,
        model: str | None = None,
        seed: int | None = None,
        run_id: str | None = None,
    ) -> int:
        row = {
            "run_id": run_id,
            "task": _text(task, "episode task"),
            # Tasks name their items with ints (Countdown) or strings (BFCL): one column, as text.
            "task_id": None if task_id is None else str(task_id),
            "strategy": strategy,
            "model": model,
            "seed": _optional_int(seed, "episode seed"),
            "status": "running",
            "created_at": time.time(),
        }
        return self._write(lambda db: db["episodes"].insert(row).last_pk, f"cannot add {task!r} episode")

    def finish_episode(self, episode_id: int, status: str, passed_first: bool, passed_final: bool) -> None:
        changes = {
            "status": _text(status, "episode status"),
            "passed_first": _flag(passed_first, "passed_first"),
            "passed_final": _flag(passed_final, "passed_final"),
            "finished_at": time.time(),
        }
        self._update("episodes", episode_id, changes, f"cannot finish episode {episode_id!r}")

    def add_attempt(
        self, episode_id: int, attempt_index: int, prompt: str, response: str, passed: bool, reason: str = ""
    ) -> int:
        row = {
            "episode_id": episode_id,
            "attempt_index": _int(attempt_index, "attempt_index"),
            "prompt": str(prompt),
            "response": str(response),
            "passed": _flag(passed, "passed"),
            "reason": reason or "",
            "created_at": time.time(),
        }
        return self._write(
            lambda db: db["attempts"].insert(row).last_pk,
            f"cannot add attempt {attempt_index!r} to episode {episode_id!r}",
        )

    def add_reflection(
        self,
        episode_id: int,
        after_attempt: int,
        text: str,
        n_tokens: int | None = None,
        reward: float | None = None,
    ) -> int:
        row = {
            "episode_id": episode_id,
            "after_attempt": _int(after_attempt, "after_attempt"),
            "text": str(text),
            "n_tokens": _optional_int(n_tokens, "n_tokens"),
            "reward": _optional_number(reward, "reflection reward"),
            "created_at": time.time(),
        }
        return self._write(
            lambda db: db["reflections"].insert(row).last_pk,
            f"cannot add reflection to episode {episode_id!r}",
        )

    def set_reflection_reward(self, reflection_id: int, reward: float) -> None:
        self._update(
            "reflections",
            reflection_id,
            {"reward": _number(reward, "reflection reward")},
            f"cannot reward reflection {reflection_id!r}",
        )

    def get_episode(self, episode_id: int) -> dict | None:
        """The episode with its "attempts" (by attempt_index) and "reflections" (by after_attempt)."""

        def fn(db: sqlite_utils.Database) -> dict | None:
            episode = self._get(db, "episodes", episode_id)
            if episode is not None:
                episode["attempts"] = self._rows(
                    db, "attempts", {"episode_id": episode_id}, "attempt_index, id"
                )
                episode["reflections"] = self._rows(
                    db, "reflections", {"episode_id": episode_id}, "after_attempt, id"
                )
            return episode

        return self._read(fn)

    def list_episodes(self, run_id: str | None = None, task: str | None = None) -> list[dict]:
        """Episode rows (without attempts and reflections) in the order they were added."""
        return self._read(
            lambda db: self._rows(db, "episodes", {"run_id": run_id, "task": task}, "created_at, id")
        )
