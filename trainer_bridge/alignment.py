"""Update alignment: the cosine between this step's gradient and the opposite of the previous step's
parameter update, `cos(g_t, -u_{t-1})`. It is the hypergradient of Baydin et al. 2018 ("Online Learning
Rate Adaptation with Hypergradient Descent") normalized, with its sign turned: the update is linear in
the lr, so d loss_t / d lr = g_t . u_{t-1} / lr, and a positive alignment (successive steps agree) says a
higher lr would have lowered the loss, a negative one (they oppose: the run overshoots) a lower one. For plain SGD u = -lr g, and the
alignment is cos(g_t, g_{t-1}); for Adam u is the Adam step, whatever the optimizer actually did
(weight decay included).

No loop changes: two hooks on the optimizer (`register_step_pre_hook` / `register_step_post_hook`).
Before a step the parameters are copied aside (after the cosine against the previous update is taken);
after it the copy becomes `before - after`, the opposite of the update just made. The copy is the whole
memory cost: one float32 copy of the parameters the optimizer trains (under DDP on every rank, each from
its own gradients; a sharded optimizer sees its own shard). The work per step: a copy, a subtraction and
two dot products over the parameters (the gradient concatenated in runs of up to 64 MB), with no host
sync until the value is read at the next boundary.

A step the optimizer is handed a closure for (Lightning) computes its gradient inside the step: the
closure is wrapped, and the cosine taken once it has run. A step skipped by a gradient scaler never
calls the optimizer: the next step is compared with the last update made.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from selfsteer.trainer_bridge import optim

METRIC = "update_alignment"
CHUNK = 1 << 24  # elements of gradient concatenated at once (a temporary of up to 64 MB in float32)


class UpdateAlignment:
    """Measures the update alignment of the steps an optimizer takes (see the module docstring).

    `active`: off while the core is inside a boundary: steps taken there (a probe's arms, from a snapshot
    that is put back) are not the run's. `forget()` after the weights jumped (a rollback): the previous
    update belongs to another trajectory. `take()`: the value of the last step, once."""

    def __init__(self) -> None:
        self.optimizer: Any = None
        self.active = True
        self._handles: list[Any] = []
        self._params: list[torch.Tensor] = []
        self._flats: dict[torch.device, torch.Tensor] = {}
        # Views into the flats: the params before a step, then before - after = -update.
        self._buffers: list[torch.Tensor] = []
        self._spans: list[tuple[torch.device, int, int]] = []  # each param's place in its device's flat
        self._have_update = False
        self._pending = False
        self._value: torch.Tensor | None = None

    def attach(self, optimizer: Any) -> None:
        """Hooks onto `optimizer` (accelerate's wrapper is unwrapped); a new optimizer replaces the old."""
        inner = optim.unwrap_optimizer(optimizer)
        if inner is self.optimizer:
            return
        self.detach()
        if not hasattr(inner, "register_step_pre_hook"):
            return  # not a torch optimizer (a DeepSpeed engine's own): nothing measured
        self.optimizer = inner
        self._handles = [inner.register_step_pre_hook(self._pre), inner.register_step_post_hook(self._post)]

    def detach(self) -> None:
        """Removes the hooks and frees the copy."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.optimizer = None
        self._params, self._buffers, self._spans, self._flats = [], [], [], {}
        self.forget()

    def forget(self) -> None:
        self._have_update = self._pending = False
        self._value = None

    def drop(self) -> None:
        """Lets the last value go unread (a rank that does not log)."""
        self._value = None

    def take(self) -> float | None:
        """The alignment of the last step taken since the previous `take`; None when there is none (the
        first step, or no gradient or no update to compare), or when it is not finite."""
        value, self._value = self._value, None
        if value is None:
            return None
        value = float(value)
        return value if math.isfinite(value) else None

    # ---- the hooks

    def _pre(self, optimizer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.active:
            return None
        # `args` holds the optimizer itself first, then the closure if it was passed by position.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._before_step()
            return None
        done = False

        def measured_closure(*a: Any, **k: Any) -> Any:
            nonlocal done
            loss = closure(*a, **k)
            if not done:  # LBFGS calls it again at other points: the first call is at the step's start
                done = True
                self._before_step()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": measured_closure}
        return (args[0], measured_closure, *args[2:]), kwargs

    def _post(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        if not (self.active and self._pending):
            return
        self._pending = False
        with torch.no_grad():
            torch._foreach_sub_(self._buffers, self._params)
        self._have_update = True

    @torch.no_grad()
    def _before_step(self) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        if len(params) != len(self._params) or any(
            a is not b for a, b in zip(params, self._params, strict=True)
        ):
            self._allocate(params)  # the first step, or the optimizer's parameters changed: start over
        if self._have_update:
            self._value = self._cosine()
        torch._foreach_copy_(self._buffers, self._params)
        self._pending = True

    def _allocate(self, params: list[torch.Tensor]) -> None:
        """One flat float32 buffer per device, each parameter's copy a view into it: the update's norm is
        one reduction, and a run of gradients is compared with one slice of it."""
        sizes: dict[torch.device, int] = {}
        for p in params:
            sizes[p.device] = sizes.get(p.device, 0) + p.numel()
        self._flats = {
            device: torch.empty(n, dtype=torch.float32, device=device) for device, n in sizes.items()
        }
        offsets = dict.fromkeys(sizes, 0)
        self._params, self._buffers, self._spans = params, [], []
        for p in params:
            start = offsets[p.device]
            offsets[p.device] = end = start + p.numel()
            self._buffers.append(self._flats[p.device][start:end].view(p.shape))
            self._spans.append((p.device, start, end))
        self._have_update = False

    def _cosine(self) -> torch.Tensor | None:
        """cos(g, before - after of the last step), over the parameters that have a gradient now. The
        gradients are read in runs of consecutive parameters (same device and dtype, at most `CHUNK`
        elements), each concatenated once: a few kernels a step, not a few per parameter."""
        device = next(iter(self._flats))
        dot = torch.zeros((), dtype=torch.float32, device=device)
        grad_sq = torch.zeros((), dtype=torch.float32, device=device)
        run: list[torch.Tensor] = []
        where: tuple = ()  # (device, dtype, start, end) of the run

        def flush() -> None:
            nonlocal dot, grad_sq
            if run:
                grad = torch.cat(run).float() if len(run) > 1 else run[0].float()
                dev, _, start, end = where
                dot += torch.dot(grad, self._flats[dev][start:end]).to(device)
                grad_sq += torch.dot(grad, grad).to(device)
                run.clear()

        for p, (dev, start, end) in zip(self._params, self._spans, strict=True):
            grad = p.grad
            if grad is None:
                flush()
                continue
            grad = (grad.to_dense() if grad.is_sparse else grad).reshape(-1)
            if run and (where[:2] != (dev, grad.dtype) or where[3] != start or end - where[2] > CHUNK):
                flush()
            if not run:
                where = (dev, grad.dtype, start, end)
            run.append(grad)
            where = (*where[:3], end)
        flush()
        update_sq = sum(torch.dot(flat, flat).to(device) for flat in self._flats.values())
        return dot / torch.sqrt(grad_sq * update_sq)


def trained_parameters(optimizer: Any) -> int:
    """How many parameters the optimizer trains (what measuring the alignment costs, in floats)."""
    return sum(p.numel() for g in optim.unwrap_optimizer(optimizer).param_groups for p in g["params"])
