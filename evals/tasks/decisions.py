"""`decisions:DIR`: a supervisor's own decisions as a self-correction task, over counterfactual rows.

An item is a decision point of a collected run (`selfsteer decisions collect --out DIR`): what the run
looked like, and the eval loss each action (double, halve, keep the lr) reached from that exact state.
So every answer's outcome is known exactly, and a reflection is rewarded without running any training:

- the first try is the supervisor's decision (`policy`: the shipped intervener by default), given;
- it fails when its regret (how much worse its loss is than the best action's, relative) exceeds the
  noise margin, and the reason the reflector reads is what the run showed after it (the eval loss
  before and after, in %), not which action would have been best;
- the retry is decided by a frozen actor (`agents/reflector.py` Actor: the embedded model, untrained;
  Retroformer's split), which
  reads the conversation, the reflection in it, and picks among the actions left: the failed one is
  barred mechanically (only the others are scored), so a plain retry already gains by elimination and
  a reflection has to beat that. The actor's scores are calibrated by the same conversation with its
  content blanked (contextual calibration, Zhao et al. 2021): uncalibrated, the 135M model answers
  "double" after nearly any conversation and follows a reflection's advice no more often than a coin
  (22 of 40 on training rows); calibrated, 98 of 120, while the plain retry stays at the coin's rate;
- the retry passes when its action is within the margin of the best.

The split is by workload (model shape, optimizer, schedule): a workload's rows are all train or all
test (`split_of` on its key), so test rows come from workloads a reflector never trained on. The
evaluation-only workloads (`EVALUATION_WORKLOADS`, docs/held-out-workloads.md) are test rows whatever
their hash.

First tries are cached in DIR/first-tries/POLICY.jsonl (delete it to decide again).
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
from pathlib import Path

from tqdm import tqdm

from selfsteer.agents.counterfactual_rows import CounterfactualRow
from selfsteer.agents.intervener_data import noise_margin, observation_of, read_rows, regret
from selfsteer.agents.reflector import PROMPTS, SYSTEM, Actor, decision_prompt, outcome_reason
from selfsteer.agents.registry import make_supervisor
from selfsteer.evals.counterfactual import evaluation_workload, workload_key
from selfsteer.tools.tasks import Problem, Verdict, check_split, split_of
from selfsteer.trainer_bridge.records import ACTIONS

DEFAULT_POLICY = "intervener"
TEST_FRACTION = 0.2
_ACTION = re.compile(r"\b(double|halve|keep)\b")


def split_of_row(row: CounterfactualRow) -> str:
    if evaluation_workload(row.spec) is not None:
        return "test"
    return split_of(f"decisions/{workload_key(row.spec)}", TEST_FRACTION)


def action_of(answer: str) -> str | None:
    """The first action an answer names (plain text or the decision JSON), or None."""
    found = _ACTION.search(answer.lower())
    return found.group(1) if found else None


def item_id(row: CounterfactualRow) -> str:
    return f"{row.run}@{row.step}"


# -----------------------------------------------------------------------------------------------------
# the verdict: exact, from the row's outcomes


def outcome_text(row: CounterfactualRow, action: str) -> str:
    """What the run showed after `action`: the eval loss at the decision and after the horizon."""
    losses = row.observed.eval_loss
    before = losses[-1][1] if losses else None
    return outcome_reason(action, before, row.outcomes[action], row.horizon or row.spec.get("eval_steps"))


def validator(row: CounterfactualRow, margin: float):
    def validate(answer: str) -> Verdict:
        action = action_of(answer)
        if action is None:
            return Verdict(False, "the answer names no action (double, halve or keep).", math.inf)
        cost = regret(row, action)
        if cost <= margin:
            return Verdict(True, "correct", cost)
        return Verdict(False, outcome_text(row, action), cost)

    return validate


# -----------------------------------------------------------------------------------------------------
# a model-free retry: a table fitted on training failures


_CHANGE = re.compile(r"\(([+-]\d+(?:\.\d+)?)%\)")


def failure_cell(action: str, reason: str) -> tuple[str, str]:
    """What every retry reads of a failure, coarsely: the failed action, and whether the eval loss rose
    after it ("rose"; a diverged run too) or not ("fell") by the reason's own words."""
    change = _CHANGE.search(reason)
    rose = "diverged" in reason or (change is not None and float(change.group(1)) > 0)
    return action, "rose" if rose else "fell"


def fit_retry_table(problems: list[Problem]) -> dict[tuple[str, str], str]:
    """For each failure cell (`failure_cell`) of these problems' failed first tries, the action left
    (the failed one barred) whose retry passes most often; ties go to ACTIONS' order. A baseline any
    reflection should beat: it reads only what the failure reason says, and learns from the same rows."""
    passes: dict[tuple[str, str], dict[str, int]] = {}
    for problem in problems:
        verdict = problem.validate(problem.first_answer or "")
        action = action_of(problem.first_answer or "")
        if verdict.passed or action is None:
            continue
        counts = passes.setdefault(
            failure_cell(action, verdict.reason), {a: 0 for a in ACTIONS if a != action}
        )
        for retry in counts:
            counts[retry] += problem.validate(retry).passed
    return {
        cell: max(counts, key=lambda a: (counts[a], -ACTIONS.index(a))) for cell, counts in passes.items()
    }


def table_retry(table: dict[tuple[str, str], str], action: str, reason: str) -> str:
    """The table's retry after `action` failed for `reason`; in a cell it never saw, keep (halve after
    a failed keep): undo the change."""
    return table.get(failure_cell(action, reason), "halve" if action == "keep" else "keep")


# -----------------------------------------------------------------------------------------------------
# the first tries: a supervisor's decisions, cached


_cache_lock = threading.Lock()


def first_tries(directory: Path, rows: list[CounterfactualRow], policy: str) -> dict[str, str]:
    """The policy's action at each row, from DIR/first-tries/POLICY.jsonl where decided before."""
    slug = re.sub(r"[^\w.-]+", "_", policy)
    path = directory / "first-tries" / f"{slug}.jsonl"
    known: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                known[record["id"]] = record["action"]
    missing = [row for row in rows if item_id(row) not in known]
    if not missing:
        return known

    supervisor = None if policy == "keep" else make_supervisor(policy)
    if supervisor is None and policy != "keep":
        raise ValueError("the first-try policy cannot be 'none': use keep")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _cache_lock, path.open("a") as file:
        for row in tqdm(missing, desc=f"first tries ({policy})", unit="decision"):
            action = supervisor.decide(observation_of(row)).action if supervisor else "keep"
            known[item_id(row)] = action
            file.write(json.dumps({"id": item_id(row), "action": action}) + "\n")
            file.flush()
    return known


# -----------------------------------------------------------------------------------------------------
# the loader


def _draw(rows: list[CounterfactualRow], seed: int) -> list[CounterfactualRow]:
    """The rows in the order a load with this seed takes them (its first n are the items it returns)."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    return order


def loader(directory: str):
    """The task over the rows collected in `directory` (searched recursively for rows.jsonl)."""
    root = Path(directory)

    def load(
        split: str = "train",
        n: int | None = None,
        seed: int = 0,
        policy: str | None = None,
        not_drawn_by: tuple[int, tuple[int, ...]] | None = None,
    ) -> list[Problem]:
        """`not_drawn_by=(N, seeds)` leaves out the items that loading this split with `n=N` and each of
        these seeds returns: the rows that training runs on those draws never saw (validation rows)."""
        check_split(split)
        rows = [r for r in read_rows([root]) if all(a in r.outcomes for a in ACTIONS)]
        if not rows:
            raise ValueError(f"no decision rows in {root}: collect some with `selfsteer decisions collect`")
        margin = noise_margin(rows)
        chosen = [row for row in rows if split_of_row(row) == split]
        if not_drawn_by is not None:
            n_drawn, seeds = not_drawn_by
            drawn = {item_id(row) for s in seeds for row in _draw(chosen, s)[:n_drawn]}
            chosen = [row for row in chosen if item_id(row) not in drawn]
        chosen = _draw(chosen, seed)
        chosen = chosen[:n] if n is not None else chosen
        policy_name = policy or DEFAULT_POLICY
        tries = first_tries(root, chosen, policy_name)
        return [
            Problem(
                id=item_id(row),
                prompt=decision_prompt(observation_of(row)),
                validate=validator(row, margin),
                system=SYSTEM,
                task=f"decisions:{root.name}",
                first_answer=tries[item_id(row)],
                actor=Actor([tries[item_id(row)]]),
                prompts=PROMPTS,
            )
            for row in chosen
        ]

    return load
