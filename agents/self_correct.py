"""Self-correction for supervisors: a decision that changed the learning rate is judged at the next
evaluation; one that made things worse is reflected on, rolled back and retried (graphs/supervise.py
runs the loop; this module holds the judgement and the reflection).

The expectation: had the decision not been taken, the eval loss would not have risen. The margin: a
failure is a rise of more than `MARGIN` (2%) over the eval loss the decision saw, or a loss that is no
longer finite. Measured on the counterfactual dev data (`python -m selfsteer.evals.check_calibration`:
4,240 double/halve decisions with an eval trend before them, each also forked into keep): the keep
branch ended below the decision's eval loss in 3 of 4 states, so "no rise" is a cautious stand-in
for keep. This rule fails 10.8% of the decisions, with a precision of 0.80 (a failed decision did end
worse than keep) and a recall of 0.22, and those carry 79% of the loss that all bad decisions added
(the big, costly mistakes). Rules that carry the trend before the decision forward fail 27-45% of
decisions at a precision near 0.6: each false alarm costs a rollback's steps and a good decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, Field

from selfsteer.agents.observation import Observation

MARGIN = 0.02
MAX_REFLECTION_CHARS = 240


@dataclass
class Verdict:
    """The judgement of one decision at the next evaluation."""

    failed: bool
    step: int  # the step of the evaluation that judged it
    loss_before: float  # the eval loss the decision saw
    loss_after: float
    expected: float  # the loss had it not been taken (not above loss_before)
    margin: float  # relative, of loss_before

    @property
    def limit(self) -> float:
        return self.expected * (1 + self.margin)


def judge(
    loss_before: float, decision_step: int, observation: Observation, margin: float = MARGIN
) -> Verdict | None:
    """The verdict on a decision taken at `decision_step` when the loss was `loss_before`, from the first
    evaluation after it; None while there is none yet."""
    later = [(s, v) for s, v in observation.eval_loss if s > decision_step]
    if not later:
        return None
    step, loss_after = later[0]
    failed = not math.isfinite(loss_after) or loss_after > loss_before * (1 + margin)
    return Verdict(failed, step, loss_before, loss_after, loss_before, margin)


def factual_reflection(
    action: str, lr_before: float, lr_after: float, decision_step: int, verdict: Verdict
) -> str:
    """What happened, in one sentence: the reflection of a supervisor that cannot write one."""
    after = f"{verdict.loss_after:.3f}" if math.isfinite(verdict.loss_after) else str(verdict.loss_after)
    return (
        f"At step {decision_step} I chose to {action} the learning rate ({lr_before:.3g} -> {lr_after:.3g}); "
        f"by step {verdict.step} the eval loss went from {verdict.loss_before:.3f} to {after}, above the "
        f"{verdict.limit:.3f} allowed, so that {action} made training worse here."
    )


class Reflection(BaseModel):
    """What a chat-model supervisor writes about its own failed decision."""

    reflection: str = Field(
        max_length=MAX_REFLECTION_CHARS,
        description="one sentence: why the decision made the loss worse, and what to do instead",
    )


def reflection_prompt(observation: Observation, action: str, facts: str) -> list[tuple[str, str]]:
    return [
        (
            "system",
            "You supervise the training of a neural network and check your own decisions. One of them "
            "made the loss worse. In one short sentence, say why and what you will do instead.",
        ),
        ("user", f"{facts}\nThe run when you decided:\n{observation.table()}\nWhy did {action} fail?"),
    ]
