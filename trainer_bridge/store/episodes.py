"""Reflect episodes (self-correction on a task item): each episode's attempts, and the reflections
written between them with their rewards.
"""

from __future__ import annotations

import time

import sqlite_utils

from selfsteer.trainer_bridge.records import EpisodeAttempt, EpisodeReflection, NewEpisode
from selfsteer.trainer_bridge.store.base import StoreBase
from selfsteer.trainer_bridge.store.checks import _flag, _number, _record, _text


class EpisodesMixin(StoreBase):
    def add_episode(self, episode: NewEpisode) -> int:
        row = {**_record(episode, NewEpisode).model_dump(), "status": "running", "created_at": time.time()}
        return self._write(
            lambda db: db["episodes"].insert(row).last_pk, f"cannot add {episode.task!r} episode"
        )

    def finish_episode(self, episode_id: int, status: str, passed_first: bool, passed_final: bool) -> None:
        changes = {
            "status": _text(status, "episode status"),
            "passed_first": _flag(passed_first, "passed_first"),
            "passed_final": _flag(passed_final, "passed_final"),
            "finished_at": time.time(),
        }
        self._update("episodes", episode_id, changes, f"cannot finish episode {episode_id!r}")

    def add_attempt(self, episode_id: int, attempt: EpisodeAttempt) -> int:
        row = {
            **_record(attempt, EpisodeAttempt).model_dump(),
            "episode_id": episode_id,
            "passed": int(attempt.passed),
            "created_at": time.time(),
        }
        return self._write(
            lambda db: db["attempts"].insert(row).last_pk,
            f"cannot add attempt {attempt.attempt_index!r} to episode {episode_id!r}",
        )

    def add_reflection(self, episode_id: int, reflection: EpisodeReflection) -> int:
        row = {
            **_record(reflection, EpisodeReflection).model_dump(),
            "episode_id": episode_id,
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
