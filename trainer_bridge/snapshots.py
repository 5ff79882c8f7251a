"""Exact in-memory snapshots of a live run: everything the next steps depend on (weights, optimizer and
scheduler state, RNG), copied at a step boundary and put back bit for bit. A fork that never touches
the disk: the counterfactual collector's branches, a probe of candidate lrs, a fast rollback
(`save_checkpoint {"memory": true}`). On-disk checkpoints (checkpoints.py) survive the process; these
do not, and cost a copy of the model and the optimizer state in memory each.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from selfsteer.trainer_bridge.alignment import trained_parameters
from selfsteer.trainer_bridge.checkpoints import rng_state, set_rng_state
from selfsteer.trainer_bridge.optim import unwrap_scheduler

MEMORY_CHECKPOINTS = 8  # in-memory checkpoints kept per run, the oldest dropped first


@dataclass
class Snapshot:
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict | None
    rng: dict
    meta: dict = field(default_factory=dict)  # what the caller keeps with it (branch, max_grad_norm, ...)


def take(model: torch.nn.Module, optimizer: Any, scheduler: Any, step: int, **meta: Any) -> Snapshot:
    """A copy of the state at this boundary; the live objects go on untouched."""
    return Snapshot(
        step=step,
        model={k: v.detach().clone() for k, v in model.state_dict().items()},
        optimizer=copy.deepcopy(optimizer.state_dict()),
        scheduler=copy.deepcopy(unwrap_scheduler(scheduler).state_dict()) if scheduler is not None else None,
        rng=rng_state(),
        meta=meta,
    )


def restore(snapshot: Snapshot, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
    """Puts the snapshot back into the live objects (it stays usable for another restore)."""
    model.load_state_dict(snapshot.model)
    optimizer.load_state_dict(copy.deepcopy(snapshot.optimizer))
    if scheduler is not None and snapshot.scheduler is not None:
        unwrap_scheduler(scheduler).load_state_dict(copy.deepcopy(snapshot.scheduler))
    set_rng_state(snapshot.rng)


def nbytes(snapshot: Snapshot) -> int:
    """Roughly what it holds in memory: its tensors."""
    tensors = list(snapshot.model.values())
    for state in snapshot.optimizer.get("state", {}).values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def start(ctx: Any, wanted: bool | None, auto_max_params: int) -> Snapshot | None:
    """The run before its first step (a StepContext's), for a probe's restart arms: when `wanted`, or
    (None) when the optimizer trains at most `auto_max_params` parameters."""
    if ctx.optimizer is None:
        return None
    if wanted is None:
        wanted = trained_parameters(ctx.optimizer) <= auto_max_params
    return take(ctx.model, ctx.optimizer, ctx.lr_scheduler, ctx.step) if wanted else None


def keep(bridge: Any, name: str, snapshot: Snapshot) -> dict:
    """Keeps `snapshot` as the bridge's in-memory checkpoint `name`, which `load_checkpoint` finds; the
    latest MEMORY_CHECKPOINTS are kept. Returns its checkpoint info."""
    bridge.memory_checkpoints[name] = snapshot
    while len(bridge.memory_checkpoints) > MEMORY_CHECKPOINTS:
        bridge.memory_checkpoints.popitem(last=False)
    info = {"name": name, "path": None, "memory": True, "step": snapshot.step, "branch": bridge.branch}
    bridge.checkpoints[name] = info
    return info
