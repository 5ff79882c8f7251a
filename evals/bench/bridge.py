"""Benchmark: what steering costs a training run.

Paired runs of one recipe, a plain `transformers.Trainer` against the same Trainer behind the bridge
(server up, every metric stored and streamed), alternating which goes first; the figures are medians:

- wall-time ratio with 1 WebSocket subscriber (target <= 1.02x) and with 50 (target <= 1.03x);
  the subscribers live in another process, as a dashboard or an agent would;
- POST-to-applied latency of commands sent at random moments: in steps (the journal's step minus the
  step the run was at when the POST arrived; target 1) and in ms (POST sent -> success event received).

    python evals/bench/bridge.py [--recipe small] [--steps 60] [--pairs 3] [--commands 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from websockets.asyncio.client import connect

from selfsteer.trainer_bridge.client import BridgeClient
from selfsteer.trainer_bridge.records import FINISHED_PHASES, strict_json

# torch, transformers and the runner stay imported inside the functions that use them: the subscriber
# process runs this file (--subscribe) and must not import torch.

# -----------------------------------------------------------------------------
# the subscriber process: N WebSocket clients that read every event until told to stop


async def _subscribe(url: str, n: int) -> None:
    counts = [0] * n
    connections = [
        await connect(url.replace("http", "ws", 1) + "/api/events", max_size=None) for _ in range(n)
    ]

    async def read(i: int, ws) -> None:
        try:
            async for _ in ws:
                counts[i] += 1
        except Exception:  # the server went away at the end of the run
            pass

    tasks = [asyncio.ensure_future(read(i, ws)) for i, ws in enumerate(connections)]
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    for task in tasks:
        task.cancel()
    print(strict_json({"events": sum(counts)}), flush=True)


class Subscribers:
    def __init__(self, url: str, n: int):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--subscribe", url, "--n", str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"subscribers did not start: {line!r}")

    def stop(self) -> int:
        out, _ = self.proc.communicate(timeout=60)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        return json.loads(lines[-1])["events"] if lines else 0


# -----------------------------------------------------------------------------
# runs

RATIOS = ("wall", "cpu", "step_p25", "step_p50")


def make_step_timer():
    """A callback timing the seconds between consecutive step ends: one optimizer step plus everything
    around it (logging, the bridge's boundary, metric writes). Low quantiles of these are what bursts of
    load on a shared machine disturb least. (Built here: the subscriber process must not import torch.)"""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.last: float | None = None
            self.durations: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self.last is not None:
                self.durations.append(now - self.last)
            self.last = now

    return StepTimer()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed_run(recipe: dict, root: Path, interactive: bool, subscribers: int = 0) -> dict:
    """Wall and CPU seconds of one run (train + final eval). CPU: this process (trainer, server, torch
    threads), plus the subscriber process separately. On a shared machine CPU time is the steadier one."""
    from selfsteer.trainer_bridge.runner import RecipeRun

    out = Path(tempfile.mkdtemp(dir=root))
    db = root / "bench.sqlite"
    timer = make_step_timer()
    run = RecipeRun(
        recipe,
        out_dir=out,
        db=db,
        port=0 if interactive else None,
        interactive=interactive,
        callbacks=[timer],
    )
    subs = Subscribers(run.url, subscribers) if subscribers else None
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time()
    try:
        summary = run.train()
        cpu = time.process_time() - cpu
    finally:
        events = subs.stop() if subs else 0
        run.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    sub_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    steps = timer.durations
    return {
        "wall": summary["wall_s"],
        "cpu": cpu,
        "step_p25": quantile(steps, 0.25),
        "step_p50": quantile(steps, 0.5),
        "subscriber_cpu": sub_cpu,
        "events": events,
    }


def paired_ratios(recipe: dict, root: Path, pairs: int, subscribers: int) -> dict:
    rows = []
    for i in range(pairs):
        # Alternate the order, so a machine that slows down (or warms up) does not favour one side.
        if i % 2 == 0:
            a = timed_run(recipe, root, False)
            b = timed_run(recipe, root, True, subscribers)
        else:
            b = timed_run(recipe, root, True, subscribers)
            a = timed_run(recipe, root, False)
        row = {"plain": a, "bridge": b}
        for key in ("wall", "cpu", "step_p25", "step_p50"):
            row[f"{key}_ratio"] = b[key] / a[key]
        rows.append(row)
        print(
            f"  pair {i + 1}: plain {a['wall']:.2f} s, bridge+{subscribers} ws {b['wall']:.2f} s: "
            f"wall {row['wall_ratio']:.4f}, cpu {row['cpu_ratio']:.4f}, "
            f"step p25 {row['step_p25_ratio']:.4f} ({a['step_p25'] * 1000:.1f} vs {b['step_p25'] * 1000:.1f} ms), "
            f"step p50 {row['step_p50_ratio']:.4f}; {b['events']} frames received, "
            f"subscribers' cpu {b['subscriber_cpu']:.2f} s",
            flush=True,
        )
    medians = {f"median_{k}_ratio": statistics.median(r[f"{k}_ratio"] for r in rows) for k in RATIOS}
    return {"subscribers": subscribers, **medians, "pairs": rows}


def latency(recipe: dict, root: Path, commands: int) -> dict:
    """Sends set_max_grad_norm (to its current value: no effect on training) at random moments."""
    from selfsteer.trainer_bridge.runner import RecipeRun

    run = RecipeRun(recipe, out_dir=Path(tempfile.mkdtemp(dir=root)), db=root / "bench.sqlite", port=0)
    client = BridgeClient(run.url, source="bench")
    value = float(recipe["training"].get("max_grad_norm", 1.0))
    applied_at: dict[str, float] = {}
    sent: list[tuple[str, int, float]] = []
    listening = threading.Event()

    def listen() -> None:
        for event in BridgeClient(run.url).events():
            listening.set()
            if event["event"] == "command" and event["command"]["status"] == "success":
                applied_at.setdefault(event["command"]["uuid"], time.perf_counter())
            if event["event"] == "state" and event["state"]["phase"] in FINISHED_PHASES:
                return

    def send() -> None:
        rng = random.Random(0)
        while len(sent) < commands and run.bridge.phase in ("created", "running"):
            time.sleep(rng.uniform(0.05, 0.4))
            if run.bridge.phase != "running" or run.bridge.training_done:
                continue
            start = time.perf_counter()
            try:
                reply = client.set_max_grad_norm(value)
            except Exception:  # the run ended between the check and the POST
                return
            sent.append((reply["uuid"], reply["step"], start))

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    listening.wait(10)
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        run.train()
    finally:
        sender.join(10)
        listener.join(10)
        rows = {row["uuid"]: row for row in client.commands()}
        client.close()
        run.close()
    steps, ms = [], []
    for uuid, step_at_post, start in sent:
        row = rows.get(uuid)
        if row and row["status"] == "success" and uuid in applied_at:
            steps.append(row["step"] - step_at_post)
            ms.append((applied_at[uuid] - start) * 1000)
    if not steps:
        return {"commands": 0}
    return {
        "commands": len(steps),
        "median_steps": statistics.median(steps),
        "max_steps": max(steps),
        "median_ms": statistics.median(ms),
        "p90_ms": sorted(ms)[int(0.9 * (len(ms) - 1))],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="small")
    parser.add_argument("--steps", type=int, default=60, help="max_steps of each run (default 60)")
    parser.add_argument("--pairs", type=int, default=3, help="paired runs per condition (default 3)")
    parser.add_argument("--commands", type=int, default=20, help="commands for the latency run (default 20)")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    parser.add_argument("--subscribe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.subscribe:
        asyncio.run(_subscribe(args.subscribe, args.n))
        return 0

    import torch
    from transformers.utils import logging as hf_logging

    from selfsteer.trainer_bridge.recipe import load_recipe

    hf_logging.set_verbosity_error()
    overrides = [f"training.max_steps={args.steps}", "training.eval_strategy=no"]
    recipe = load_recipe(args.recipe, overrides)
    print(
        f"recipe {args.recipe}, {args.steps} steps a run, {args.pairs} pairs a condition, "
        f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load average {os.getloadavg()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        timed_run(recipe, root, False)  # warm-up: imports, allocator, corpus cache
        print("server + 1 WebSocket subscriber:", flush=True)
        one = paired_ratios(recipe, root, args.pairs, 1)
        print("server + 50 WebSocket subscribers:", flush=True)
        fifty = paired_ratios(recipe, root, args.pairs, 50)
        print("latency:", flush=True)
        lat = latency(recipe, root, args.commands)
    figures = {"recipe": args.recipe, "steps": args.steps, "one_subscriber": one, "fifty_subscribers": fifty}
    figures["latency"] = lat
    print(f"\nload average at the end {os.getloadavg()} (other work on the machine shows in wall times)")
    for label, fig, target in (("1 WS subscriber", one, 1.02), ("50 WS subscribers", fifty, 1.03)):
        print(
            f"server + {label}: median wall-time ratio {fig['median_wall_ratio']:.4f}x (target <= {target}); "
            f"CPU-time {fig['median_cpu_ratio']:.4f}x; step time p25 {fig['median_step_p25_ratio']:.4f}x, "
            f"p50 {fig['median_step_p50_ratio']:.4f}x"
        )
    if lat.get("commands"):
        print(
            f"POST-to-applied latency: median {lat['median_steps']} step(s) (max {lat['max_steps']}; target 1), "
            f"median {lat['median_ms']:.1f} ms (p90 {lat['p90_ms']:.1f} ms) over {lat['commands']} commands"
        )
    if args.out:
        Path(args.out).write_text(strict_json(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
