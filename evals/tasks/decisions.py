"""`decisions:DIR`: a supervisor's own decisions as a self-correction task, over counterfactual rows.

An item is a decision point of a collected run (`selfsteer decisions collect --out DIR`): what the run
looked like, and the eval loss each action (double, halve, keep the lr) reached from that exact state.
So every answer's outcome is known exactly, and a reflection is rewarded without running any training:

- the first try is the supervisor's decision (`policy`: the shipped intervener by default), given;
- it fails when its regret (how much worse its loss is than the best action's, relative) exceeds the
  noise margin, and the reason the reflector reads is what the run showed after it (the eval loss
  before and after, in %), not which action would have been best;
- the retry is decided by a frozen actor (the embedded model, untrained: Retroformer's split), which
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
from functools import cache
from pathlib import Path

from selfsteer.agents.intervener_data import noise_margin, observation_of, read_rows, regret
from selfsteer.evals.counterfactual import evaluation_workload, workload_key
from selfsteer.tools.tasks import Message, Problem, Verdict, check_split, split_of
from selfsteer.trainer_bridge.records import ACTIONS

PROMPTS = "decisions"  # prompts/reflect_decisions.yaml: the loop's texts for this task
DEFAULT_POLICY = "intervener"
TEST_FRACTION = 0.2
SYSTEM = (
    "You supervise the training of a neural network. After each evaluation you decide whether to double, "
    "halve or keep its learning rate. Answer with one word: double, halve or keep."
)
_ACTION = re.compile(r"\b(double|halve|keep)\b")


def split_of_row(row: dict) -> str:
    if evaluation_workload(row["spec"]) is not None:
        return "test"
    return split_of(f"decisions/{workload_key(row['spec'])}", TEST_FRACTION)


def action_of(answer: str) -> str | None:
    """The first action an answer names (plain text or the decision JSON), or None."""
    found = _ACTION.search(answer.lower())
    return found.group(1) if found else None


def item_id(row: dict) -> str:
    return f"{row['run']}@{row['step']}"


# -----------------------------------------------------------------------------------------------------
# the verdict: exact, from the row's outcomes


def _eval_loss_before(row: dict) -> float | None:
    losses = row["observation"].get("eval_loss") or []
    return losses[-1][1] if losses else None


def outcome_text(row: dict, action: str) -> str:
    """What the run showed after `action`: the eval loss at the decision and after the horizon."""
    after, before = row["outcomes"][action], _eval_loss_before(row)
    steps = row.get("horizon") or row["spec"].get("eval_steps")
    if after is None or not math.isfinite(after):
        return f"after you chose {action}, the loss diverged (NaN) within {steps} steps."
    if before is None:
        return f"after you chose {action}, the eval loss was {after:.3f} {steps} steps later."
    change = 100 * (after - before) / before
    return (
        f"after you chose {action}, the eval loss went from {before:.3f} to {after:.3f} ({change:+.1f}%) "
        f"in {steps} steps, and another action would have done better."
    )


def validator(row: dict, margin: float):
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
# the actor: the frozen embedded model, choosing among the actions not barred


@cache
def _actor_engine():
    from selfsteer.agents.local_llm import LocalEngine, load_embedded_model

    return LocalEngine(*load_embedded_model())


def content_free(messages: list[Message]) -> list[Message]:
    """The conversation with its content blanked: every user turn and every assistant turn after the first
    (the failed decision stays) replaced by "N/A". The actor's prior over the actions, in this shape."""
    blanked, answered = [], False
    for message in messages:
        if message["role"] == "user" or (message["role"] == "assistant" and answered):
            message = {**message, "content": "N/A"}
        answered = answered or message["role"] == "assistant"
        blanked.append(message)
    return blanked


def actor(barred: str | None, engine=None):
    """The retry's decider: among the actions not barred, the one whose log-probability after the
    conversation rises most above its log-probability after the content-free conversation."""
    allowed = [a for a in ACTIONS if a != barred]

    def decide(messages: list[Message]) -> str:
        chosen = engine or _actor_engine()
        scores = chosen.score_options(chosen.chat_prompt_ids(messages), allowed)
        prior = chosen.score_options(chosen.chat_prompt_ids(content_free(messages)), allowed)
        lift = [score - base for score, base in zip(scores, prior, strict=True)]
        return allowed[max(range(len(allowed)), key=lift.__getitem__)]

    return decide


# -----------------------------------------------------------------------------------------------------
# the first tries: a supervisor's decisions, cached


_cache_lock = threading.Lock()


def first_tries(directory: Path, rows: list[dict], policy: str) -> dict[str, str]:
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
    from tqdm import tqdm

    from selfsteer.agents.supervisors import load_supervisor

    supervisor = None if policy == "keep" else load_supervisor(policy)
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


def prompt(row: dict) -> str:
    """The decision point in relative terms only: the loss's moves in %, its noise, the lr as multiples
    of its start and of its last change (no absolute lr, which means different things per workload)."""
    values = observation_of(row).prompt_values()
    return f"{values['signals']}{values['warnings']}\nDecide: double, halve or keep the learning rate."


def loader(directory: str):
    """The task over the rows collected in `directory` (searched recursively for rows.jsonl)."""
    root = Path(directory)

    def load(
        split: str = "train", n: int | None = None, seed: int = 0, policy: str | None = None
    ) -> list[Problem]:
        check_split(split)
        rows = [r for r in read_rows([root]) if all(a in r["outcomes"] for a in ACTIONS)]
        if not rows:
            raise ValueError(f"no decision rows in {root}: collect some with `selfsteer decisions collect`")
        margin = noise_margin(rows)
        chosen = [row for row in rows if split_of_row(row) == split]
        random.Random(seed).shuffle(chosen)
        chosen = chosen[:n] if n is not None else chosen
        policy_name = policy or DEFAULT_POLICY
        tries = first_tries(root, chosen, policy_name)
        return [
            Problem(
                id=item_id(row),
                prompt=prompt(row),
                validate=validator(row, margin),
                system=SYSTEM,
                task=f"decisions:{root.name}",
                first_answer=tries[item_id(row)],
                actor=actor(tries[item_id(row)]),
                prompts=PROMPTS,
            )
            for row in chosen
        ]

    return load
