"""Is there anything for GRPO to learn? The reward signal of reflections, measured before training.

    .venv/bin/python -m selfsteer.evals.reflect_signal --task countdown:2 --n 64 --failures 24 --group 4
    .venv/bin/python -m selfsteer.evals.reflect_signal --task bfcl:simple_python --call-mode tools \
        --retry-temperatures 0,0.7

GRPO on reflections learns only from groups in which some reflections' retries pass and others fail
(a group with equal rewards has zero advantages). This takes the model's failed first attempts at `--n`
training problems (greedy, as `reflect train` mines them), samples `--group` reflections for each of the
first `--failures` (temperature `--temperature`), and retries each with the reflection in context, per
strategy, greedy and (with `--retry-temperatures`) sampled. With `--call-mode tools` (bfcl) every answer but
the reflection is a tool call decoded under the tools' grammar, so a sampled retry is still a well-formed
call. `--feedback` (bfcl's loader option) shows the reflection and the plain retry which check failed,
without the answer key (prompts/reflect_feedback.yaml). It prints how many retries passed and how many
groups would have a gradient. Zero everywhere means GRPO would never move a weight on this model and task.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

import torch

from selfsteer.agents.llm.chat import LocalChatModel
from selfsteer.agents.llm.local_engines import get_local_engine
from selfsteer.evals.tasks import load_task
from selfsteer.graphs.reflect import first_messages, reflect_messages, render_tool_calls, retry_messages
from selfsteer.tools.tasks import CALL_MODES
from selfsteer.trainer_bridge.records import strict_json


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="countdown:2")
    parser.add_argument("--call-mode", choices=CALL_MODES, default=None, help="bfcl: tools or text")
    parser.add_argument("--n", type=int, default=64, help="training problems to mine failures from")
    parser.add_argument("--failures", type=int, default=24, help="failures to reflect on")
    parser.add_argument("--group", type=int, default=4, help="reflections sampled per failure")
    parser.add_argument("--temperature", type=float, default=1.0, help="of the reflections")
    parser.add_argument(
        "--feedback", action="store_true", help="cite what failed (the answer key left out) to both"
    )
    parser.add_argument("--strategies", default="reflect_attempt,reflect,retry")
    parser.add_argument("--retry-temperatures", default="0", help="comma-separated; 0 is greedy")
    parser.add_argument("--max-tokens", type=int, default=96, help="first attempt; reflections get 64")
    parser.add_argument("--retry-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = get_local_engine()

    chat = LocalChatModel()

    def generate(conversations, max_tokens, temperature=0.0, seed=0, problems=None):
        """Plain text, or with `problems` that offer tools, their calls (rendered), decoded under their
        grammar; concurrent calls, which the engine batches."""
        if problems and any(p.tools for p in problems):

            def call(i):
                p = problems[i]
                model = chat.bind_tools(list(p.tools), tool_choice=p.tool_choice)
                options = {"max_new_tokens": max_tokens, "temperature": temperature, "seed": seed + i}
                return render_tool_calls(model.invoke(conversations[i], **options))

            with ThreadPoolExecutor(32) as pool:
                return list(pool.map(call, range(len(conversations))))
        futures = [
            engine.submit(
                engine.chat_prompt_ids(c), max_new_tokens=max_tokens, temperature=temperature, seed=seed + i
            )
            for i, c in enumerate(conversations)
        ]
        return [future.result().text for future in futures]

    problems = load_task(
        args.task, "train", args.n, args.seed, call_mode=args.call_mode, feedback=args.feedback or None
    )
    firsts = generate([first_messages(p) for p in problems], args.max_tokens, problems=problems)
    verdicts = [p.validate(a) for p, a in zip(problems, firsts, strict=True)]
    failures = [
        (p, a, [v.reason]) for p, a, v in zip(problems, firsts, verdicts, strict=True) if not v.passed
    ]
    report = {
        "task": args.task,
        "call_mode": args.call_mode,
        "feedback": args.feedback,
        "problems": len(problems),
        "first_try_acc": 1 - len(failures) / len(problems),
    }
    failures = failures[: args.failures]
    group = args.group
    reflections = generate(
        [
            reflect_messages(p, [a], version=p.prompts or "v1", reasons=r)
            for p, a, r in failures
            for _ in range(group)
        ],
        64,
        args.temperature,
        args.seed,
    )
    report.update(failures=len(failures), group=group, results=[])
    for strategy in args.strategies.split(","):
        for temperature in map(float, args.retry_temperatures.split(",")):
            conversations = [
                retry_messages(
                    p,
                    strategy,
                    [a],
                    [] if strategy == "retry" else [reflections[i * group + g]],
                    version=p.prompts or "v1",
                    reasons=r,
                )
                for i, (p, a, r) in enumerate(failures)
                for g in range(group)
            ]
            retried = [failures[k // group][0] for k in range(len(conversations))]
            retries = generate(conversations, args.retry_tokens, temperature, args.seed + 10_000, retried)
            passed = [failures[k // group][0].validate(r).passed for k, r in enumerate(retries)]
            groups = [passed[i * group : (i + 1) * group] for i in range(len(failures))]
            repeated = sum(r.strip() == failures[k // group][1].strip() for k, r in enumerate(retries))
            row = {
                "strategy": strategy,
                "retry_temperature": temperature,
                "retries": len(passed),
                "passed": sum(passed),
                "groups_with_signal": sum(any(g) and not all(g) for g in groups),
                "repeat_the_failed_attempt": repeated,
            }
            report["results"].append(row)
            print(
                f"{strategy:16s} retry T={temperature:<4} passed {row['passed']}/{row['retries']}   groups with "
                f"signal {row['groups_with_signal']}/{len(groups)}   repeats {repeated}",
                flush=True,
            )
    print(strict_json(report, indent=2))
    return report


if __name__ == "__main__":
    main()
