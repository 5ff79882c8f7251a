"""Throughput of the self-correction loop on the embedded model: episodes run concurrently (their
model calls share padded batches) against one at a time.

    .venv/bin/python -m selfsteer.evals.bench.reflect [--episodes 32] [--sequential 8] [--max-tokens 32]

The sequential rate is measured on the first `--sequential` problems (one at a time takes minutes on
a CPU); the concurrent rate on all `--episodes`. Both use greedy decoding, the same problems and the
same strategy, so the answers are the same and only the scheduling differs.
"""

from __future__ import annotations

import argparse
import time

import torch

from selfsteer.agents.llm.chat import LocalChatModel
from selfsteer.evals.tasks import load_task
from selfsteer.graphs.reflect import ReflectConfig, run_episodes
from selfsteer.trainer_bridge.records import strict_json


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="countdown")
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=8, help="episodes for the one-at-a-time rate")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--strategy", default="reflect_attempt")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    problems = load_task(args.task, split="test", n=args.episodes, seed=0)
    llm = LocalChatModel(max_new_tokens=args.max_tokens)
    config = ReflectConfig(strategy=args.strategy, max_retries=1)
    llm.invoke("warm up")  # load the model outside the timings

    def timed(subset, concurrency):
        engine = llm.engine
        before = dict(engine.stats)
        started = time.perf_counter()
        results = run_episodes(llm, subset, config, concurrency=concurrency, progress=True)
        wall = time.perf_counter() - started
        calls = engine.stats["requests"] - before["requests"]
        batches = engine.stats["batches"] - before["batches"]
        return results, {
            "episodes": len(subset),
            "wall_s": round(wall, 2),
            "episodes_per_s": len(subset) / wall,
            "model_calls": calls,
            "forward_batches": batches,
        }

    sequential_results, sequential = timed(problems[: args.sequential], concurrency=1)
    concurrent_results, concurrent = timed(problems, concurrency=args.episodes)
    same = all(
        a.attempts[-1]["response"] == b.attempts[-1]["response"]
        for a, b in zip(sequential_results, concurrent_results, strict=False)
    )
    report = {
        "task": args.task,
        "strategy": args.strategy,
        "max_tokens": args.max_tokens,
        "torch_threads": torch.get_num_threads(),
        "one_at_a_time": sequential,
        "concurrent": concurrent,
        "speedup": concurrent["episodes_per_s"] / sequential["episodes_per_s"],
        "same_answers": same,
    }
    print(strict_json(report, indent=2))
    print(
        f"one at a time: {sequential['episodes_per_s']:.3f} episodes/s   "
        f"{args.episodes} concurrent: {concurrent['episodes_per_s']:.3f} episodes/s   "
        f"speedup x{report['speedup']:.1f}"
    )
    return report


if __name__ == "__main__":
    main()
