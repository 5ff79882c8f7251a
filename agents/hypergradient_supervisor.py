"""The `hypergradient` supervisor: a baseline that reads the sign of the hypergradient.

The steering core logs `update_alignment` at every optimizer step (trainer_bridge/alignment.py): the
cosine between the step's gradient and the opposite of the previous step's update. It is the
hypergradient of Baydin et al. 2018 ("Online Learning Rate Adaptation with Hypergradient Descent"),
normalized and with its sign turned: positive when successive steps agree (a higher lr would have
lowered the loss), negative when they oppose (the run overshoots: a lower one would have). Where
hypergradient descent nudges the lr every step, this decides at each evaluation, from the mean alignment
of the steps since the previous one: above `double_above` double, below `halve_below` halve, else keep.
A non-finite loss halves. No model and no absolute lr: only the sign and size of a cosine.

The defaults were read off the built-in `tiny` and `small` recipes only (static runs of 60 steps over a
grid of lrs, the mean per interval of 10 and 15 steps; then the lr-suite's three starts, seed 0). A
start too low shows +0.2 to +0.4 (tiny 1e-4 .. 1e-3, small 1e-5 .. 1e-4); the best lrs after their
first interval -0.02 to +0.05 (tiny 3e-3 .. 1e-2, small 1e-3); lrs too high -0.015 to -0.05, also when
the loss has blown up (tiny at 1.0: -0.02 to -0.035). The negative side is small (gradients in a noisy
regime are nearly orthogonal to the last step: a slight but steady opposition is already overshooting)
and overlaps the best lrs' noise: `halve_below` -0.01 halved the too-high starts more often than -0.02
(lr-suite final eval loss, too_high start: tiny 3.387 against 3.475, small 3.281 against 3.311; the
other starts alike), and a halving from a good lr late in a run costs little.
"""

from __future__ import annotations

import math
import statistics

from selfsteer.agents.observation import Observation
from selfsteer.agents.supervisors import Decision, Supervisor


class HypergradientSupervisor(Supervisor):
    """double_above: double when the mean alignment since the previous evaluation is above it.
    halve_below: halve when it is below it (a negative number)."""

    name = "hypergradient"
    strategy = "hypergradient"

    def __init__(self, double_above: float = 0.05, halve_below: float = -0.01):
        if not halve_below < double_above:
            raise ValueError(f"halve_below ({halve_below}) must be below double_above ({double_above})")
        self.double_above = double_above
        self.halve_below = halve_below

    def decide(self, observation: Observation) -> Decision:
        losses = observation.train_loss[-5:] + observation.eval_loss[-2:]
        if any(not math.isfinite(value) for _, value in losses):
            return self._checked(
                observation, Decision("halve", "the loss is not finite: the lr is far too high")
            )
        since = observation.eval_loss[-2][0] if len(observation.eval_loss) >= 2 else 0
        values = observation.alignments(since)
        if not values:
            return Decision("keep", f"no update alignment logged after step {since}: keep")
        mean = statistics.fmean(values)
        figure = f"mean update alignment {mean:+.3f} over the {len(values)} steps after step {since}"
        if mean > self.double_above:
            decision = Decision(
                "double",
                f"{figure}, above {self.double_above:+g}: successive steps agree, the lr can go higher",
            )
        elif mean < self.halve_below:
            decision = Decision(
                "halve", f"{figure}, below {self.halve_below:+g}: successive steps oppose, the lr is too high"
            )
        else:
            return Decision("keep", f"{figure}, within {self.halve_below:+g} .. {self.double_above:+g}: keep")
        return self._checked(observation, decision)

    @staticmethod
    def _checked(observation: Observation, decision: Decision) -> Decision:
        """Keep instead of an action already tried from this state and rolled back (self-correction)."""
        if decision.action in observation.avoid:
            return Decision(
                "keep", f"{decision.explanation}; but {decision.action} was rolled back from here: keep"
            )
        return decision
