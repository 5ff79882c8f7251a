"""Does a trained reflector help a supervisor correct its failed lr decisions? Measured on decision rows
the reflector never trained on (the test split of `decisions:DIR`: whole workloads held out, and the
evaluation-only workloads).

    python -m selfsteer.evals.reflector_eval --tasks decisions:/data/cf,decisions:/data/reflector-heldout \\
        --reflector agents/reflector --out docs/reflector

Ways to retry each failed first try (the shipped intervener's decision), on the same items:
- `trained`: the trained reflector writes the reflection, the frozen actor retries with it in context;
- `untrained`: the same with the untrained embedded model writing the reflection;
- `plain`: no reflection, only the news of the failure (strategy retry);
- `table` (with `--table-from DIR`): no model at all, a lookup table from the failed action and whether
  the loss rose after it (both in the failure reason) to the retry that passed most often on the failed
  first tries of a training draw of DIR's train split (`--table-draw N:SEED`, reflect train's --n and
  --seed): what the reason alone is worth to a learner.
The failed action is barred in all of them (the actor scores only the others), so `plain` is the bar a
reflection has to clear. Per task and pooled: retry accuracy on the failed first tries with 95% Wilson
intervals, the paired differences (trained - plain, - untrained, - table) with 95% paired-bootstrap
intervals, and the mean regret of the final decisions. Writes OUT/summary.json and OUT/report.md.

To choose between reflectors without scoring any on test rows, `--unseen-by N:SEEDS` scores validation
rows instead: the train split's items that `reflect train --n N --seed S` drew for none of the seeds
(docs/reflector/README.md, "A second look"). `--conditions` runs only some of the three retries.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import mean

from selfsteer.agents.reflector import reflector_chat
from selfsteer.evals.tasks import get_loader, load_task
from selfsteer.evals.tasks.decisions import action_of, fit_retry_table, table_retry
from selfsteer.evals.tasks.metrics import bootstrap_ci, wilson_ci
from selfsteer.graphs.reflect import ReflectConfig, run_episodes
from selfsteer.trainer_bridge.records import strict_json

CONDITIONS = ("trained", "untrained", "plain", "table")
DEFAULT_CONDITIONS = CONDITIONS[:3]


def paired_ci(differences: list[float]) -> tuple[float, float]:
    """The 95% bootstrap interval of a mean paired difference (the same items under two conditions)."""
    return bootstrap_ci(differences, n_boot=4000)


def evaluate(
    task: str,
    reflector: str,
    policy: str | None,
    max_tokens: int,
    n: int | None,
    unseen_by: tuple[int, tuple[int, ...]] | None = None,
    conditions: tuple[str, ...] = DEFAULT_CONDITIONS,
    table: dict[tuple[str, str], str] | None = None,
) -> dict:
    """`unseen_by=(N, seeds)`: the train split's items that training with `--n N --seed S` (each S) never
    drew, for choosing between reflectors without scoring any on test rows; None: the test rows.
    `conditions`: a subset of CONDITIONS (the others are not run, nor their differences); `table`, the
    fitted retry table, is needed for "table"."""
    if unseen_by is None:
        problems = load_task(task, split="test", n=n, policy=policy)
    else:
        problems = get_loader(task)(split="train", n=n, policy=policy, not_drawn_by=unseen_by)
    failed = [p for p in problems if not p.validate(p.first_answer).passed]
    models: dict[str, object] = {}  # loaded when a condition first needs one
    outcomes: dict[str, dict] = {}
    for condition in conditions:
        if condition == "table":
            outcomes[condition] = table_outcome(failed, table)
            continue
        strategy = "retry" if condition == "plain" else "reflect_attempt"
        which = "trained" if condition == "trained" else "untrained"  # plain: the model is never asked
        if which not in models:
            models[which] = reflector_chat(reflector if which == "trained" else None, max_tokens)
        llm = models[which]
        results = run_episodes(llm, failed, ReflectConfig(strategy=strategy), progress=True)
        outcomes[condition] = {
            **scored([r.passed_final for r in results], [r.attempts[-1]["cost"] for r in results]),
            "reflections": [r.reflections[0]["text"] if r.reflections else "" for r in results][:5],
        }
    summary = {
        "task": task if unseen_by is None else f"{task} (train items not drawn by {unseen_by})",
        "n_items": len(problems),
        "n_failed_first": len(failed),
        "first_try_acc": 1 - len(failed) / len(problems) if problems else 0.0,
        "regret_first_mean": mean(p.validate(p.first_answer).cost for p in failed) if failed else 0.0,
        **{c: {k: v for k, v in outcomes[c].items() if k != "passed"} for c in conditions},
    }
    summary["_passed"] = {c: outcomes[c]["passed"] for c in conditions}
    return {**summary, **differences(summary["_passed"])}


def scored(passed: list[bool], costs: list[float]) -> dict:
    """One condition's retries: accuracy with its Wilson interval, the mean regret after them, and each
    item's pass (kept for the paired differences)."""
    passes = [float(p) for p in passed]
    return {
        "retry_acc": mean(passes) if passes else 0.0,
        "retry_ci95": list(wilson_ci(int(sum(passes)), len(passes))),
        "regret_final_mean": mean(costs) if costs else 0.0,
        "passed": passes,
    }


def table_outcome(failed: list, table: dict[tuple[str, str], str] | None) -> dict:
    """The table's retries of the failed first tries, scored as the others are."""
    if table is None:
        raise ValueError("the table condition needs a fitted table (--table-from DIR)")
    verdicts = []
    for problem in failed:
        first = problem.validate(problem.first_answer)
        verdicts.append(problem.validate(table_retry(table, action_of(problem.first_answer), first.reason)))
    return scored([v.passed for v in verdicts], [v.cost for v in verdicts])


def fitted_table(directory: str, draw: tuple[int, int], policy: str | None) -> dict[tuple[str, str], str]:
    """The retry table fitted on the training draw (`reflect train --n N --seed S`) of decisions:DIR."""
    n, seed = draw
    return fit_retry_table(get_loader(f"decisions:{directory}")(split="train", n=n, seed=seed, policy=policy))


def conditions(text: str) -> tuple[str, ...]:
    """--conditions: a comma-separated subset of CONDITIONS, kept in their order."""
    chosen = {c.strip() for c in text.split(",") if c.strip()}
    if not chosen or chosen - set(CONDITIONS):
        raise argparse.ArgumentTypeError(f"expected some of {','.join(CONDITIONS)}, not {text!r}")
    return tuple(c for c in CONDITIONS if c in chosen)


def draw(text: str) -> tuple[int, int]:
    """N:SEED, as `--table-draw` takes it: 1000:0 -> (1000, 0)."""
    try:
        n, seed = text.split(":")
        return int(n), int(seed)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:SEED such as 1000:0, not {text!r}") from None


def unseen_by(text: str) -> tuple[int, tuple[int, ...]]:
    """N:SEEDS, as `--unseen-by` takes it: 1000:0,1 -> (1000, (0, 1))."""
    try:
        n, seeds = text.split(":")
        return int(n), tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:SEEDS such as 1000:0,1, not {text!r}") from None


OTHERS = ("plain", "untrained", "table")  # what the trained reflector is compared with


def differences(passed: dict[str, list[float]]) -> dict:
    """trained - plain, - untrained and - table, paired on the same items, where both conditions ran."""
    out: dict = {}
    for other in OTHERS:
        if "trained" not in passed or other not in passed:
            continue
        paired = [a - b for a, b in zip(passed["trained"], passed[other], strict=True)]
        out[f"trained_minus_{other}"] = mean(paired) if paired else 0.0
        out[f"trained_minus_{other}_ci95"] = list(paired_ci(paired)) if paired else [0.0, 0.0]
    return out


def pooled(summaries: list[dict]) -> dict:
    conditions = [c for c in CONDITIONS if all(c in s["_passed"] for s in summaries)]
    passed = {c: [x for s in summaries for x in s["_passed"][c]] for c in conditions}
    out: dict = {"task": "pooled", "n_failed_first": sum(s["n_failed_first"] for s in summaries)}
    for c in conditions:
        out[c] = {
            "retry_acc": mean(passed[c]) if passed[c] else 0.0,
            "retry_ci95": list(wilson_ci(int(sum(passed[c])), len(passed[c]))),
        }
    return {**out, **differences(passed)}


def report(summaries: list[dict], reflector: str) -> str:
    def ci(pair) -> str:
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]"

    def cell(s: dict, key: str, signed: bool = False) -> str:  # a condition or a difference; "-": not run
        if key in CONDITIONS:
            return f"{s[key]['retry_acc']:.3f} {ci(s[key]['retry_ci95'])}" if key in s else "-"
        return f"{s[key]:{'+' if signed else ''}.3f} {ci(s[key + '_ci95'])}" if key in s else "-"

    lines = [
        f"# Reflector on decision rows: {reflector}",
        "",
        "Retry accuracy on the failed first tries (the shipped intervener's decisions), 95% Wilson intervals;",
        "differences paired on the same items, 95% paired-bootstrap intervals. The failed action is barred in",
        "every condition.",
        "",
        "| rows | failed first tries | trained | untrained | plain retry | table | trained - plain "
        "| trained - untrained | trained - table |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        cells = [cell(s, c) for c in CONDITIONS]
        cells += [cell(s, f"trained_minus_{other}", signed=True) for other in OTHERS]
        lines.append(f"| {s['task']} | {s['n_failed_first']} | {' | '.join(cells)} |")
    regrets = [s for s in summaries if "regret_first_mean" in s]
    if regrets:
        lines += [
            "",
            "Mean regret of the decision (relative eval loss above the best action's), failed items:",
            "",
        ]
        lines += [
            "| rows | first try | trained | untrained | plain retry | table |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for s in regrets:
            lines.append(
                f"| {s['task']} | {s['regret_first_mean']:.4f} | "
                + " | ".join(f"{s[c]['regret_final_mean']:.4f}" if c in s else "-" for c in CONDITIONS)
                + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tasks", required=True, help="comma-separated decisions:DIR tasks (their test rows)"
    )
    parser.add_argument("--reflector", required=True, help="the trained reflector (adapter or model folder)")
    parser.add_argument(
        "--policy", default=None, help="the first tries' supervisor (default: the intervener)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=48, help="reflection length (default 48, as trained)"
    )
    parser.add_argument("--n", type=int, default=None, help="at most this many test items per task")
    parser.add_argument(
        "--conditions",
        default=",".join(DEFAULT_CONDITIONS),
        type=conditions,
        help=f"which retries to run, comma-separated, of {','.join(CONDITIONS)} (default "
        f"{','.join(DEFAULT_CONDITIONS)}; table needs --table-from)",
    )
    parser.add_argument(
        "--table-from",
        default=None,
        metavar="DIR",
        help="decision rows whose training draw fits the table retry (e.g. runs/cf); adds table to the "
        "conditions",
    )
    parser.add_argument(
        "--table-draw",
        type=draw,
        default=(1000, 0),
        metavar="N:SEED",
        help="the training draw the table is fitted on, as reflect train --n N --seed SEED (default 1000:0)",
    )
    parser.add_argument(
        "--unseen-by",
        type=unseen_by,
        default=None,
        metavar="N:SEEDS",
        help="validation rows instead of test rows: the train split's items that `reflect train --n N` "
        "with each of these --seed values never drew (e.g. 1000:0,1), to choose between reflectors",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    chosen, table = args.conditions, None
    if args.table_from is not None:
        table = fitted_table(args.table_from, args.table_draw, args.policy)
        chosen = tuple(c for c in CONDITIONS if c in chosen or c == "table")
    elif "table" in chosen:
        parser.error("--conditions table needs --table-from DIR")

    summaries = [
        evaluate(t, args.reflector, args.policy, args.max_tokens, args.n, args.unseen_by, chosen, table)
        for t in args.tasks.split(",")
    ]
    if len(summaries) > 1:
        summaries.append(pooled(summaries))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for s in summaries:
        s.pop("_passed", None)
    (out / "summary.json").write_text(strict_json(summaries, indent=2))
    (out / "report.md").write_text(report(summaries, args.reflector))
    print(report(summaries, args.reflector))
    return {"summaries": summaries}


if __name__ == "__main__":
    main()
