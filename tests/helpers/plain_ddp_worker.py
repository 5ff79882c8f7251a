"""A torchrun worker for tests/test_plain_loop_ddp.py: a plain PyTorch loop steered by `selfsteer.attach`,
with a DistributedDataParallel model on gloo (CPU).

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT \\
        tests/helpers/plain_ddp_worker.py DIR [ddp|accelerate]

`ddp`: the loop wraps the model in DistributedDataParallel itself; `accelerate`: an `Accelerator(cpu=True)`
prepares the model and the optimizer (DDP and an AcceleratedOptimizer) and the loop calls
`accelerator.backward`.

Rank 0 serves on a free port (DIR/url) and sends the commands itself, over HTTP, from inside the loop's
body at the iterations of ACTIONS, so each lands at a known step boundary; the other ranks get them from
rank 0's broadcast there. Each rank draws its own batches from the global RNG, seeded per rank as nanoGPT
does (1337 + rank): a rollback must give each rank its own random state back. At the end each rank writes DIR/rank-R.json: per iteration its step, lr,
loss and branch, its final step, a checksum of its weights, what the evaluations gave, and the commands
sent (rank 0).
"""

from __future__ import annotations

import faulthandler
import gc
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import selfsteer
from selfsteer.trainer_bridge.client import BridgeClient
from selfsteer.trainer_bridge.runner import exit_now

PEAK, WARMUP, STEPS = 0.01, 4, 30
GLOBAL_BATCH = 32
# iteration -> the command rank 0 sends in its body (it applies at the boundary after it: step it + 1),
# once: after the rollback the loop runs iterations 6.. again
ACTIONS = {
    3: ("set_lr", lambda client: client.set_lr(0.004)),
    5: ("save_checkpoint", lambda client: client.save_checkpoint("at-6")),
    7: ("set_lr", lambda client: client.set_lr(0.03)),  # after the checkpoint: the rollback undoes it
    10: ("load_checkpoint", lambda client: client.load_checkpoint("at-6", branch="retry")),
    12: ("evaluate", lambda client: client.evaluate()),
    15: ("stop", lambda client: client.stop()),
}


def get_lr(it: int) -> float:
    """The loop's own schedule: a warm-up, then a linear decay."""
    return PEAK * (it + 1) / WARMUP if it < WARMUP else PEAK * (1 - 0.02 * (it - WARMUP))


def main(folder: Path, mode: str) -> None:
    accelerator = None
    if mode == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)  # under torchrun: MULTI_CPU on gloo
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same on every rank: the same initial weights, the same global batches
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK)
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model = DistributedDataParallel(model)
    assert isinstance(model, DistributedDataParallel)
    target = torch.randn(8, 1)
    torch.manual_seed(1337 + rank)  # each rank's own data from here on
    evaluations = []

    def evaluate():
        # A collective inside: every rank must evaluate at the same boundary, or this would hang.
        with torch.no_grad():
            x = torch.linspace(-1, 1, 64).reshape(8, 8)
            loss = F.mse_loss(model.module(x), x @ target).reshape(1)
        dist.all_reduce(loss)
        evaluations.append(loss.item() / world)
        return {"loss": loss.item() / world}

    steer = selfsteer.attach(
        model, optimizer, max_steps=STEPS, evaluate=evaluate, port=0, db=folder / "runs.db",
        output_dir=folder / "out", max_grad_norm=1.0, announce=False, accelerator=accelerator,
    )  # the DDP worker's attach settings # fmt: skip
    client, url = None, steer.url
    if rank == 0:
        (folder / "url.tmp").write_text(steer.url)
        (folder / "url.tmp").rename(folder / "url")
        client = BridgeClient(steer.url)
    steps, sent, actions = [], {}, dict(ACTIONS)
    for it in steer.steps():
        lr = steer.lr(get_lr(it))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = torch.randn(GLOBAL_BATCH // world, 8)  # this rank's own batch
        loss = F.mse_loss(model(x), x @ target)
        optimizer.zero_grad()
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), steer.max_grad_norm)
        optimizer.step()
        steer.log(loss=loss.item(), learning_rate=lr)
        steps.append(
            {"it": it, "step": steer.step, "lr": lr, "loss": loss.item(), "branch": steer.bridge.branch}
        )
        if client is not None and it in actions:
            kind, send = actions.pop(it)
            sent[it] = {"type": kind, "uuid": send(client)["uuid"]}
    report = {
        "rank": rank,
        "world_size": world,
        "backend": dist.get_backend(),
        "mode": mode,
        "url": url,
        "run_id": steer.bridge.run_id,
        "steps": steps,
        "final_step": steer.step,
        "stopped": steer.stopped,
        "branch": steer.bridge.branch,
        "checksum": float(sum(p.detach().double().sum() for p in model.parameters())),
        "evaluations": evaluations,
        "sent": sent,
    }
    (folder / f"rank-{rank}.json").write_text(json.dumps(report))
    if client is not None:
        client.close()
    # Teardown as RecipeRun.close does it: the DDP wrapper (its reducer holds the gloo group) goes while
    # the interpreter is whole, the ranks meet, then the group goes and the process ends at once.
    steer = model = optimizer = evaluate = None
    if accelerator is not None:
        accelerator.free_memory()
        accelerator = None
    gc.collect()
    try:
        dist.monitored_barrier(timeout=timedelta(seconds=60))
    except RuntimeError as error:
        print(f"rank {rank}: teardown barrier failed: {error}", file=sys.stderr)
    dist.destroy_process_group()
    gc.collect()


if __name__ == "__main__":
    faulthandler.enable()  # a fatal signal in teardown prints every thread's stack in the test's log
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "ddp")
    exit_now(0)
