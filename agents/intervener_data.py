"""From counterfactual rows (`selfsteer decisions collect`) to labelled decisions and chat examples.

A row holds what the run looked like at a decision point (the observation) and the eval loss each action
reached from there (`outcomes`), plus a probe: "keep" again under another data order. The label is the
best action, or "keep" where no other beats keep by the noise margin: the median of the probes' relative
spread (NOISE_QUANTILE), so that a label other than keep is a difference larger than noise typically makes.

The chat example is what the intervener sees and answers: the `intervener` prompt strategy rendered from
the observation, with the structured-output format instruction the local model adds, and as the answer
the decision JSON with a short explanation written from the table's own numbers (`grounded` checks that
every number in it is in the prompt).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from selfsteer.agents.counterfactual_rows import CounterfactualRow, IntervenerExample, read_rows
from selfsteer.agents.decision import LRDecision
from selfsteer.agents.decision_data import write_rows
from selfsteer.agents.observation import Observation
from selfsteer.prompts import load_strategy
from selfsteer.trainer_bridge.records import ACTIONS

STRATEGY = "intervener"  # the table of lr and losses per evaluation
SIGNALS = "intervener_signals"  # the loss's moves in %, its spread, the lr as multiples; no table
EVIDENCE = "intervener_evidence"  # the signals and the probe's arms against x1 (rows collected with --probe)
STRATEGIES = (STRATEGY, SIGNALS, EVIDENCE)
# The median: the probes' spread is heavy-tailed (a run near divergence lands 10% apart under another data
# order: the 90% quantile measured 11%, which labels nearly every row "keep"), so its robust scale is the
# typical noise; an action must beat keep by more than that. See `selfsteer decisions export`.
NOISE_QUANTILE = 0.5
# The probe an evidence intervener's rows carry (`decisions collect --probe`) and the one it asks for live: what
# `probe:full` asks, x0.5, x1 and x2, 4 steps each, extrapolated to two evaluation intervals (`evidence_probe`).
EVIDENCE_FACTORS, EVIDENCE_STEPS = (0.5, 1.0, 2.0), 4
# Scored beside an adapter on labelled rows (agents/intervener.py score_rows): no model, each deciding from the
# row's observation (the probe from its probe table, where the rows were collected with --probe; else it keeps).
BASELINES = ("keep", "rule", "hypergradient", "probe:full")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?")


def evidence_probe(interval: int, steps_left: int | None) -> dict:
    """The probe args of an evidence intervener's decision: every factor, extrapolated to two evaluation
    intervals, at most the steps left (and at least the arms' steps)."""
    horizon = 2 * interval if steps_left is None else min(2 * interval, steps_left)
    return {
        "factors": list(EVIDENCE_FACTORS),
        "steps": EVIDENCE_STEPS,
        "horizon": max(EVIDENCE_STEPS, horizon),
    }


# -----------------------------------------------------------------------------------------------------
# labels


def relative_spread(row: CounterfactualRow) -> float | None:
    """|probe - keep| / keep: how far the same action lands under another data order and dropout."""
    keep, probe = row.outcomes["keep"], row.probe
    if keep is None or probe is None:
        return None
    return abs(probe - keep) / keep


def noise_margin(rows: list[CounterfactualRow], quantile: float = NOISE_QUANTILE) -> float:
    """The margin an action must beat "keep" by to be the label: the `quantile` of the probes'
    relative spread."""
    spreads = sorted(s for r in rows if (s := relative_spread(r)) is not None)
    if not spreads:
        raise ValueError("no noise probes among the rows: cannot measure the margin")
    return spreads[min(len(spreads) - 1, int(quantile * len(spreads)))]


def label(row: CounterfactualRow, margin: float) -> str:
    """The best action by eval loss at the horizon; "keep" unless another beats keep by the margin."""
    losses = row.losses()
    best = min(ACTIONS, key=lambda a: losses[a])
    if (
        best != "keep"
        and math.isfinite(losses[best])
        and (not math.isfinite(losses["keep"]) or losses[best] < losses["keep"] * (1 - margin))
    ):
        return best
    return "keep"


def regret(row: CounterfactualRow, action: str) -> float:
    """How much worse `action` lands than the best action, relative (0 for the best; inf for NaN)."""
    losses = row.losses()
    best = min(losses.values())
    return 0.0 if not math.isfinite(best) else (losses[action] - best) / best


# -----------------------------------------------------------------------------------------------------
# the chat example


def observation_of(row: CounterfactualRow) -> Observation:
    """The row's observation (stored as JSON: series are lists, non-finite numbers null)."""
    return row.observed


def prompt_messages(observation: Observation, strategy: str = STRATEGY) -> list[dict]:
    """The chat the intervener gets: its strategy's prompt plus the local model's format instruction
    (as `LocalChatModel.with_structured_output(LRDecision)` sends it)."""
    # lazy: LangChain and torch (agents.llm.chat), which reading and writing the rows does not need
    from langchain_core.messages import HumanMessage, SystemMessage

    from selfsteer.agents.llm.chat import _with_format_instruction

    prompt = load_strategy(strategy)
    messages = _with_format_instruction(
        [
            SystemMessage(content=prompt.system.strip()),
            HumanMessage(content=prompt.render_user(**observation.prompt_values())),
        ],
        LRDecision.model_json_schema(),
    )
    return [{"role": "system" if m.type == "system" else "user", "content": m.content} for m in messages]


def explain(observation: Observation, action: str, strategy: str = STRATEGY) -> str:
    """A short reason for `action`, citing only numbers of the strategy's prompt."""
    if strategy == SIGNALS:
        return _explain_signals(observation, action)
    if strategy == EVIDENCE:
        return _explain_evidence(observation, action)
    rows = [line.split(" | ") for line in observation.table().splitlines()[1:]]
    lr = rows[-1][1] if rows else f"{observation.lr:.3g}"
    evals = [r[3] for r in rows if r[3] not in ("-", "nan")]
    first_train = rows[0][2] if rows else None
    last = evals[-1] if evals else (rows[-1][2] if rows else None)
    previous = evals[-2] if len(evals) >= 2 else first_train
    last, previous = (None if v in ("-", "nan") else v for v in (last, previous))
    if observation.nonfinite:
        return {
            "halve": f"The loss is not finite: {lr} is far too high, so halve it.",
            "keep": "The loss is not finite; keep the rate and watch the next evaluation.",
            "double": "The loss is not finite; try a larger rate.",
        }[action]
    if last is None or previous is None:
        return {
            "halve": "No loss yet; halve the rate to be safe.",
            "keep": "No loss measured yet, so keep the rate.",
            "double": "No loss measured yet; double the rate.",
        }[action]
    what = "Eval loss" if evals else "Train loss"
    since = (
        "the first train loss" if previous == first_train and len(evals) < 2 else "the previous evaluation"
    )
    rose = float(last) > float(previous)
    if action == "halve":
        if rose:
            return f"{what} rose from {previous} to {last}: {lr} is too high, so halve it."
        return f"{what} only went from {previous} to {last} since {since}; {lr} is too high to settle, so halve it."
    if action == "double":
        if rose:
            return f"{what} went from {previous} to {last} at {lr}; a larger rate should learn faster, so double it."
        return f"{what} fell only from {previous} to {last} at {lr}: too slow, so double it."
    if rose:
        return f"{what} went from {previous} to {last}; no change is clearly better, so keep {lr}."
    return f"{what} fell from {previous} to {last} at {lr}: steady progress, so keep it."


_MOVE = re.compile(r"(fell|rose) (\d+(?:\.\d+)?)% since")
_SPREAD = re.compile(r"spread (\d+(?:\.\d+)?)%")
_START = re.compile(r"Learning rate: (\S+x) its start")


def _explain_signals(observation: Observation, action: str) -> str:
    text = observation.signals()
    move, spread, start = _MOVE.search(text), _SPREAD.search(text), _START.search(text)
    if observation.nonfinite or move is None:
        return {
            "halve": "The loss is not finite or not measured: halve the rate to be safe.",
            "keep": "No finite loss change to judge yet, so keep the rate.",
            "double": "No finite loss change to judge yet; try a larger rate.",
        }[action]
    which = "Eval" if observation.eval_loss else "Train"
    moved, only = f"{which} loss {move[1]} {move[2]}%", f"{which} loss {move[1]} only {move[2]}%"
    if action == "halve":
        if move[1] == "rose":
            return f"{moved}: the rate is too high, so halve it."
        noise = f" with a train loss spread of {spread[1]}%" if spread else ""
        return f"{only}{noise}: the rate is too high to settle, so halve it."
    if action == "double":
        at = f" at {start[1]} its start" if start else ""
        if move[1] == "rose":
            return f"{moved}{at}; a larger rate should learn faster, so double it."
        return f"{only}{at}: too slow, so double it."
    if move[1] == "rose":
        return f"{moved}; no change is clearly better, so keep the rate."
    return f"{moved}: steady progress, so keep the rate."


_ARM = re.compile(r"^x(\S+): (.*) now, (.*) extrapolated", re.MULTILINE)


def _explain_evidence(observation: Observation, action: str) -> str:
    """The probe's arm in the action's direction, as the prompt states it against x1; the signals' reason
    where the probe has no such arm."""
    arms = {float(factor): (now, later) for factor, now, later in _ARM.findall(observation.probe_text())}
    factor = {"double": max(arms, default=1.0), "halve": min(arms, default=1.0)}.get(action)
    if factor is not None and factor != 1.0:
        now, later = arms[factor]
        return (
            f"In the probe x{factor:g} {now} now and {later} extrapolated against x1, so {action} the rate."
        )
    if action == "keep" and len(arms) > 1:
        return "No other lr in the probe is clearly better than x1, so keep the rate."
    return _explain_signals(observation, action)


def numbers(text: str) -> set[str]:
    return {_canonical(n) for n in _NUMBER.findall(text)}


def _canonical(number: str) -> str:
    try:
        return repr(float(number))
    except ValueError:
        return number


def grounded(explanation: str, prompt: str) -> bool:
    """Every number in the explanation is a number of the prompt."""
    return numbers(explanation) <= numbers(prompt)


def completion(action: str, explanation: str) -> str:
    """The answer text, as the local model's structured output spells it."""
    return json.dumps({"action": action, "explanation": explanation})


def examples(
    rows: list[CounterfactualRow], margin: float, strategy: str = STRATEGY
) -> list[IntervenerExample]:
    """One labelled chat example per row (its prompt messages, the answer), with the row's facts."""
    out = []
    for row in rows:
        observation = observation_of(row)
        action = label(row, margin)
        messages = prompt_messages(observation, strategy)
        explanation = explain(observation, action, strategy)
        assert grounded(explanation, messages[-1]["content"]), (explanation, messages[-1]["content"])
        out.append(
            IntervenerExample(
                run=row.run,
                step=row.step,
                spec=row.spec,
                lr=row.lr,
                outcomes=row.outcomes,
                probe=row.probe,
                horizon=row.horizon,
                behaviour=row.behaviour.action,
                label=action,
                regret={a: regret(row, a) for a in ACTIONS},
                prompt=messages,
                completion=[{"role": "assistant", "content": completion(action, explanation)}],
            )
        )
    return out


# -----------------------------------------------------------------------------------------------------
# export


def export_counterfactual(
    paths: Iterable[str | Path], out: str | Path, fmt: str = "jsonl"
) -> tuple[int, float]:
    """Labels the collected rows and writes them (JSON lines, or a Hugging Face dataset folder with a
    data card); returns (how many, the noise margin used)."""
    rows = read_rows(paths)
    if not rows:
        raise ValueError("the collected folders hold no rows")
    margin = noise_margin(rows)
    data = examples(rows, margin)
    write_rows([e.model_dump() for e in data], out, fmt, json_fields=("spec", "outcomes", "regret"))
    if fmt == "hf":
        (Path(out) / "README.md").write_text(data_card(data, margin))
    return len(data), margin


def data_card(data: list[IntervenerExample], margin: float) -> str:
    labels = Counter(e.label for e in data)
    runs = {e.run for e in data}
    specs = [e.spec for e in data]

    def values(key: str) -> str:
        return ", ".join(sorted({str(s[key]) for s in specs}))

    return f"""---
license: apache-2.0
task_categories: [text-generation]
tags: [selfsteer, learning-rate, counterfactual, intervener]
---
# selfsteer counterfactual learning-rate decisions

Made by `selfsteer decisions collect` and `selfsteer decisions export --counterfactual ... --format hf`.
Each row is one decision point of a small byte-level GPT-2 trained on the Python standard library's
source: the run was forked there into one branch per action (double, halve, keep the learning rate),
each continued from the identical state (weights, optimizer, scheduler, data order, RNG) for
`horizon` steps, and `outcomes` holds the eval loss each branch reached (null: not finite).

- rows: {len(data)} from {len(runs)} runs
- labels: {", ".join(f"{a} {labels.get(a, 0)}" for a in ACTIONS)}
- label: the action with the lowest eval loss at the horizon, "keep" unless another beats keep by the
  noise margin {margin:.2%} (the {NOISE_QUANTILE:.0%} quantile of |probe - keep| / keep, where the probe
  is keep again under another data order and dropout draw)
- `regret`: each action's eval loss relative to the best action's
- `prompt` / `completion`: the chat the intervener is trained on (prompt strategy `{STRATEGY}`); the
  explanation cites only numbers of the prompt
- model shapes: {values("shape")}; optimizers: {values("optimizer")}; schedules: {values("schedule")};
  batch sizes: {values("batch_size")}; seeds: {values("seed")}; behaviour policies: {values("policy")}
- held out (never collected): the lr-suite's held-out workload (a deeper model, RMSprop, and its
  start learning rates)
"""
