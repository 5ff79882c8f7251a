"""Seconds per GRPO step on reflections (the embedded SmolLM2-135M, CPU), and where they go.

    .venv/bin/python -m selfsteer.evals.bench.grpo [--modes trl,engine,engine-lora] [--steps 3]

Each mode trains `--steps` steps after one warm-up step, on the same failed Countdown attempts, with
`--generations` reflections of at most `--tokens` tokens per step and their greedy retries (at most
`--retry-tokens`). Modes: `trl` samples with TRL's own `model.generate`; `engine` decodes reflections and
retries through the batched `LocalEngine` around the model being trained; `-lora` trains a rank-16 LoRA
adapter instead of every weight; `plain` is TRL as it comes (`trl` with TRL's default gradient
checkpointing, and the forward and backward pass run on zero-advantage batches too): the baseline. The modes run one after another in one process, in the order given,
so compare them within one run (these machines are noisy). Prints the median step and its parts:
`generate` (the reflections), `reward` (the retries and the validator), the rest (loss, backward,
optimizer).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch
from transformers import TrainerCallback

from selfsteer.agents.llm.engine import LocalEngine
from selfsteer.agents.llm.weights import cache_dir, is_cached, load_embedded_model
from selfsteer.evals.tasks import load_task
from selfsteer.graphs.grpo_reflection import ReflectionGRPOConfig, build_trainer
from selfsteer.graphs.reflect import reflect_messages, reflection_reward
from selfsteer.trainer_bridge.records import strict_json


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="plain,trl,engine")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode, after one warm-up step")
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64, help="longest reflection")
    parser.add_argument("--retry-tokens", type=int, default=64)
    parser.add_argument("--task", default="countdown:3")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--signal",
        action="store_true",
        help="score the reflections 1, 0, 1, 0 ... after running their real retries, so that every group "
        "has a gradient (the untrained model's retries all fail: without this every step is zero-advantage)",
    )
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if not is_cached():
        load_embedded_model()
    problems = load_task(args.task, split="train", n=args.steps + 1, seed=0)
    # A wrong first attempt of the usual kind (all the numbers added up) stands for a mined failure.
    rows = []
    for problem in problems:
        numbers = problem.id.split("->")[0].split(",")
        failed = " + ".join(numbers)
        rows.append(
            {
                "prompt": reflect_messages(problem, [failed]),
                "problem_id": problem.id,
                "failed_attempt": failed,
            }
        )

    report = {"task": args.task, "generations": args.generations, "tokens": args.tokens, "signal": args.signal,
              "retry_tokens": args.retry_tokens, "torch_threads": torch.get_num_threads(), "modes": {}}  # the report's header fields # fmt: skip
    for mode in args.modes.split(","):
        parts: dict[str, list[float]] = {"generate": [], "reward": [], "step": []}
        reward = reflection_reward(problems)

        def timed_reward(reflections, columns, generate, reward=reward, parts=parts):
            started = time.perf_counter()
            try:
                rewards = reward(reflections, columns, generate)
                return [float(i % 2 == 0) for i in range(len(rewards))] if args.signal else rewards
            finally:
                parts["reward"].append(time.perf_counter() - started)

        output_dir = tempfile.mkdtemp(prefix=f"bench-grpo-{mode}-")
        config = ReflectionGRPOConfig(
            model=str(cache_dir()), output_dir=output_dir,
            num_generations=args.generations, max_steps=args.steps + 1, max_completion_length=args.tokens,
            max_retry_tokens=args.retry_tokens, save_steps=10_000, use_cpu=True,
            lora_r=16 if mode.endswith("-lora") else 0, skip_zero_advantage=mode != "plain",
            shuffle_dataset=False, activation_checkpointing=mode == "plain",  # plain: TRL's own default
        )  # the timed mode's config # fmt: skip
        engine = LocalEngine if mode.startswith("engine") else None
        trainer = build_trainer(config, rows, timed_reward, engine_factory=engine)
        generate = trainer._generate

        def timed_generate(prompts, generate=generate, parts=parts):
            started = time.perf_counter()
            try:
                return generate(prompts)
            finally:
                parts["generate"].append(time.perf_counter() - started)

        trainer._generate = timed_generate

        class StepTimer(TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.started = time.perf_counter()

            def on_step_end(self, *a, parts=parts, **k):
                parts["step"].append(time.perf_counter() - self.started)

        trainer.add_callback(StepTimer())
        try:
            trainer.train()
        finally:  # each mode's checkpoints and cache take about 1.6 GB
            shutil.rmtree(output_dir, ignore_errors=True)
        timed = {k: v[1:] for k, v in parts.items()}  # the first step warms up
        median = {k: statistics.median(v) for k, v in timed.items()}
        median["rest"] = median["step"] - median["generate"] - median["reward"]
        report["modes"][mode] = {
            "median_s": {k: round(v, 2) for k, v in median.items()},
            "steps_s": [round(x, 2) for x in timed["step"]],
        }
        print(
            f"{mode:12s} step {median['step']:6.2f} s   generate {median['generate']:5.2f}   "
            f"reward {median['reward']:5.2f}   rest {median['rest']:5.2f}",
            flush=True,
        )
    print(strict_json(report, indent=2))
    return report


if __name__ == "__main__":
    main()
