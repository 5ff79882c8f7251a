"""A plain PyTorch training loop in the style of nanoGPT, steered by selfsteer.

    python examples/plain_loop.py --port 0 --max-steps 300

A byte-level language model on Python's own standard library sources. The loop sets its lr itself at
every step (warm-up, then cosine decay), as nanoGPT does. The lines marked `# selfsteer` are all it
takes to steer it: the control API and the dashboard are served while it trains (the URL is printed
once the server listens), and every command applies at the next step boundary: set_optimizer,
set_max_grad_norm, pause, resume, stop, save_checkpoint, load_checkpoint (the loop goes back to the
checkpoint's step, on a new branch), evaluate.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import selfsteer

CONTEXT = 16


class TinyLM(nn.Module):
    """Predicts the next byte from the previous CONTEXT bytes."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.mix = nn.Sequential(nn.Linear(CONTEXT * width, 4 * width), nn.GELU(), nn.Linear(4 * width, 256))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.embed(x).flatten(1))


def load_bytes(limit: int = 400_000) -> torch.Tensor:
    """The first `limit` bytes of the standard library's sources, in a fixed order."""
    data = bytearray()
    for path in sorted(Path(argparse.__file__).parent.glob("*.py")):
        data += path.read_bytes()
        if len(data) >= limit:
            break
    return torch.tensor(list(data[:limit]), dtype=torch.long)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=7007, help="control server port (0: any free port)")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak lr of the loop's own schedule")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--out", default="runs/plain-loop", help="checkpoints go under OUT/checkpoints")
    parser.add_argument("--db", default=None, help="the run store (default: selfsteer's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-paused", action="store_true", help="hold at step 0 until a resume command")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    data = load_bytes()
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]

    def get_batch(source: torch.Tensor, generator: torch.Generator | None = None):
        ix = torch.randint(len(source) - CONTEXT - 1, (args.batch_size,), generator=generator)
        x = torch.stack([source[i : i + CONTEXT] for i in ix])
        return x, source[ix + CONTEXT]

    def get_lr(it: int) -> float:
        if it < args.warmup:
            return args.lr * (it + 1) / args.warmup
        progress = (it - args.warmup) / max(1, args.max_steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    @torch.no_grad()
    def estimate_loss() -> dict:
        model.eval()
        generator = torch.Generator().manual_seed(1234)  # the same eval batches each time
        losses = [
            F.cross_entropy(model(x), y).item() for x, y in (get_batch(val_data, generator) for _ in range(8))
        ]
        model.train()
        return {"loss": sum(losses) / len(losses)}

    where = {
        "port": args.port,
        "output_dir": args.out,
        "max_grad_norm": args.max_grad_norm,
        "db": args.db,
        "start_paused": args.start_paused,
    }
    steer = selfsteer.attach(
        model,
        optimizer,
        max_steps=args.max_steps,
        evaluate=estimate_loss,  # selfsteer
        eval_every=args.eval_interval,
        **where,
    )
    for it in steer.steps():  # selfsteer: was `for it in range(args.max_steps)`
        lr = steer.lr(get_lr(it))  # selfsteer: was `lr = get_lr(it)`
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_data)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if steer.max_grad_norm:  # selfsteer: was `if args.max_grad_norm`
            torch.nn.utils.clip_grad_norm_(model.parameters(), steer.max_grad_norm)
        optimizer.step()
        steer.log(loss=loss.item(), learning_rate=lr)  # selfsteer
    print(f"done at step {steer.step} on branch {steer.bridge.branch}", file=sys.stderr)


if __name__ == "__main__":
    main()
