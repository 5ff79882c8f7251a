"""A PyTorch Lightning run steered by selfsteer: one callback.

    python examples/lightning_loop.py --port 0 --max-steps 300

The byte-level model of examples/plain_loop.py as a LightningModule, with a warm-up + cosine LambdaLR
stepped every optimizer step. `SteerCallback` serves the control API and the dashboard while it trains
(the URL is printed once the server listens); every command applies at the next optimizer-step
boundary. A new lr scales the scheduler's base lrs, so it sticks through the schedule; a rollback
(load_checkpoint) restores weights, optimizer, scheduler and RNG on a new branch.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from selfsteer.integrations.lightning import SteerCallback

CONTEXT = 16


class TinyLM(nn.Module):
    """Predicts the next byte from the previous CONTEXT bytes (as in plain_loop.py)."""

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


class ByteLM(L.LightningModule):
    def __init__(self, lr: float, warmup: int, max_steps: int):
        super().__init__()
        self.model = TinyLM()
        self.lr, self.warmup, self.max_steps = lr, warmup, max_steps

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.model(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)

        def factor(step: int) -> float:
            if step < self.warmup:
                return (step + 1) / self.warmup
            progress = min(1.0, (step - self.warmup) / max(1, self.max_steps - self.warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def windows(data: torch.Tensor, count: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    ix = torch.randint(len(data) - CONTEXT - 1, (count,), generator=generator)
    return TensorDataset(torch.stack([data[i : i + CONTEXT] for i in ix]), data[ix + CONTEXT])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=7007, help="control server port (0: any free port)")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak lr of the schedule")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-interval", type=int, default=25, help="validate every N optimizer steps")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument(
        "--out", default="runs/lightning-loop", help="Lightning's root dir; checkpoints go here"
    )
    parser.add_argument("--db", default=None, help="the run store (default: selfsteer's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-paused", action="store_true", help="hold at step 0 until a resume command")
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    data = load_bytes()
    split = int(0.9 * len(data))
    train = DataLoader(
        windows(data[:split], args.max_steps * args.batch_size, args.seed), args.batch_size, shuffle=True
    )
    val = DataLoader(windows(data[split:], 256, 1234), batch_size=256)

    store = {"db": args.db} if args.db else {}
    steer = SteerCallback(port=args.port, run_name="lightning-loop", start_paused=args.start_paused, **store)
    trainer = L.Trainer(
        max_steps=args.max_steps, val_check_interval=args.eval_interval, check_val_every_n_epoch=None,
        gradient_clip_val=args.max_grad_norm, callbacks=[steer], default_root_dir=args.out,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, accelerator="cpu", devices=1,
    )  # steps, wiring, quiet, device # fmt: skip
    trainer.fit(ByteLM(args.lr, args.warmup, args.max_steps), train, val)
    print(f"done at step {trainer.global_step} on branch {steer.bridge.branch}", file=sys.stderr)


if __name__ == "__main__":
    main()
