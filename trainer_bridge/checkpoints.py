"""Checkpoints and branches.

A checkpoint is a folder laid out like a Trainer checkpoint (model.safetensors, optimizer.pt,
scheduler.pt) plus what the bridge needs to resume exactly: RNG states and the max_grad_norm in force.
Everything but the weights is saved as plain tensors/lists, so loading uses `torch.load(weights_only=True)`.

Loading a checkpoint never rewinds the Trainer's step counter (its loop keeps private bookkeeping keyed
on it): the run forks into a new *branch* that continues counting steps from where it was, with the
weights, optimizer, scheduler and RNG of the checkpoint. Metrics carry the branch name, so each branch's
curve can be drawn on its own; `checkpoint_step` says where on the parent's curve the branch starts.

Checkpoints and branches are read back from the command journal (the successful `save_checkpoint` and
`load_checkpoint` rows of a run): the journal is the one record, so no table can drift from it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from selfsteer.trainer_bridge.commands import CommandError
from selfsteer.trainer_bridge.records import strict_json
from selfsteer.trainer_bridge.store import Store

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
BRIDGE_STATE = "bridge_state.json"
RNG = "bridge_rng.pt"
RANK_RNG = "bridge_rng_rank{rank}.pt"  # under DDP every rank's own (nanoGPT seeds each rank apart)


# -----------------------------------------------------------------------------
# RNG states as weights-only-loadable objects


def rng_state() -> dict:
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(saved: dict) -> None:
    version, state, gauss = saved["python"]
    random.setstate((version, tuple(state), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = saved["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


# -----------------------------------------------------------------------------
# save / load


def _unwrap_scheduler(scheduler: Any) -> Any:
    # accelerate may wrap the scheduler; its state lives in the inner one.
    return getattr(scheduler, "scheduler", scheduler)


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, meta: dict) -> None:
    """Writes the folder; `meta` (step, branch, max_grad_norm, ...) goes to bridge_state.json."""
    path.mkdir(parents=True, exist_ok=False)
    save_model(model, str(path / WEIGHTS))  # drops tied duplicates (lm_head = wte) and restores them
    if getattr(model, "config", None) is not None and hasattr(model.config, "to_json_file"):
        model.config.to_json_file(str(path / "config.json"))  # so from_pretrained(path) works too
    torch.save(optimizer.state_dict(), path / OPTIMIZER)
    if scheduler is not None:
        torch.save(_unwrap_scheduler(scheduler).state_dict(), path / SCHEDULER)
    torch.save(rng_state(), path / RNG)
    (path / BRIDGE_STATE).write_text(strict_json(meta, indent=1))


def read_meta(path: Path) -> dict:
    file = path / BRIDGE_STATE
    return json.loads(file.read_text()) if file.exists() else {}


def save_rank_rng(path: Path, rank: int) -> None:
    """This rank's RNG state beside a checkpoint rank 0 wrote (the folder exists)."""
    torch.save(rng_state(), path / RANK_RNG.format(rank=rank))


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, rank: int | None = None
) -> dict:
    """Loads the folder into the live objects; returns its meta. Everything is read and checked before
    anything is changed, so a bad checkpoint leaves the run as it was. `rank`: under DDP, this rank's
    own RNG state is loaded where the checkpoint has one."""
    if not (path / WEIGHTS).is_file():
        raise CommandError(f"{path} is not a checkpoint (no {WEIGHTS})")
    try:
        optimizer_state = (
            torch.load(path / OPTIMIZER, weights_only=True) if (path / OPTIMIZER).exists() else None
        )
        scheduler_state = (
            torch.load(path / SCHEDULER, weights_only=True) if (path / SCHEDULER).exists() else None
        )
        rng_file = path / RANK_RNG.format(rank=rank) if rank is not None else None
        if rng_file is None or not rng_file.exists():
            rng_file = path / RNG
        rng = torch.load(rng_file, weights_only=True) if rng_file.exists() else None
    except Exception as exc:
        raise CommandError(f"cannot read checkpoint {path}: {exc}") from exc
    if optimizer_state is not None and len(optimizer_state["param_groups"]) != len(optimizer.param_groups):
        raise CommandError(f"checkpoint {path} was saved with another optimizer layout")
    # The weights go first: load_model checks names and shapes (strict) before copying anything.
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=True)
    except RuntimeError as exc:
        raise CommandError(f"checkpoint {path} does not fit this model: {exc}") from exc
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    if scheduler is not None and scheduler_state is not None:
        _unwrap_scheduler(scheduler).load_state_dict(scheduler_state)
    if rng is not None:
        set_rng_state(rng)
    meta = read_meta(path)
    meta["restored"] = {
        "optimizer": optimizer_state is not None,
        "scheduler": scheduler is not None and scheduler_state is not None,
        "rng": rng is not None,
    }
    return meta


# -----------------------------------------------------------------------------
# the journal's view


def list_checkpoints(store: Store, run_id: str) -> list[dict]:
    """Checkpoints of a run in the order they were saved: {name, path, step, branch, source, uuid}."""
    rows = []
    for command in store.list_commands(run_id, status="success"):
        if command["type"] == "save_checkpoint" and command["result"]:
            rows.append({**command["result"], "source": command["source"], "uuid": command["uuid"]})
    return rows


def list_branches(store: Store, run_id: str) -> list[dict]:
    """The branch tree as a list, root first: {name, parent, checkpoint, checkpoint_step, fork_step}."""
    branches = [
        {
            "name": "main",
            "parent": None,
            "checkpoint": None,
            "checkpoint_step": 0,
            "fork_step": 0,
            "uuid": None,
        }
    ]
    for command in store.list_commands(run_id, status="success"):
        if command["type"] == "load_checkpoint" and command["result"]:
            result = command["result"]
            branches.append(
                {
                    "name": result["branch"],
                    "parent": result["parent"],
                    "checkpoint": result["checkpoint"],
                    "checkpoint_step": result["checkpoint_step"],
                    "fork_step": result["fork_step"],
                    "uuid": command["uuid"],
                }
            )
    return branches
