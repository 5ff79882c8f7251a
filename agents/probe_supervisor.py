"""The `probe` supervisor: decides from evidence, not from the look of a loss curve.

Before each decision the loop runs a `probe` (trainer_bridge/probe.py): from an exact snapshot of the
run, each candidate multiple of the lr in force trains a few steps on the same batches, and each arm's
eval-slice loss is extrapolated to the horizon. Among the arms whose measured loss is within `margin`
(relative) of the best measured, the one with the lowest estimate wins, if it beats the x1 arm's
estimate by more than `margin`, or if x1's measured loss is not among them; otherwise keep. The
extrapolation counters short-horizon bias (measured alone, 4 steps never showed a 100x too low lr on tiny
a 1% gain), and the measurement keeps it from overruling a clear result. A classical proposer: no model, no absolute lr,
so nothing to learn about a workload's lr scale, and nothing that fails to transfer.

Its cost is `len(factors) x steps` optimizer steps per decision (journaled with each probe; the lr-suite
counts them in `compute_steps`).
"""

from __future__ import annotations

import math

from selfsteer.agents.observation import Observation, arm_loss
from selfsteer.agents.supervisors import Decision, LLMSupervisor, Supervisor, embedded_chat_model


class ProbeSupervisor(Supervisor):
    """factors: the multiples of the lr probed (1 is always among them: the arm to beat).
    steps: optimizer steps per arm. margin: how much lower (relative) the winner's estimate must be.
    horizon: the steps each arm is extrapolated to; default twice the interval between evaluations
    (the decision's effect lasts at least until the next one), at most the steps left."""

    name = "probe"
    strategy = "probe"

    def __init__(
        self,
        factors: tuple[float, ...] = (0.5, 1.0, 2.0),
        steps: int = 4,
        margin: float = 0.01,
        horizon: int | None = None,
    ):
        if 1.0 not in factors:
            factors = (*factors, 1.0)
        self.factors = tuple(sorted(factors))
        self.steps = steps
        self.margin = margin
        self.horizon = horizon

    def evidence(self, observation: Observation) -> dict | None:
        horizon = self.horizon
        if horizon is None:
            evals = [s for s, _ in observation.eval_loss]
            interval = evals[-1] - evals[-2] if len(evals) >= 2 else (evals[-1] if evals else 2 * self.steps)
            horizon = 2 * max(interval, 1)
            if observation.max_steps:
                horizon = min(horizon, observation.max_steps - observation.step)
        return {"factors": list(self.factors), "steps": self.steps, "horizon": max(horizon, self.steps)}

    def decide(self, observation: Observation) -> Decision:
        probe = observation.probe or {}
        barred = {"double": lambda f: f > 1, "halve": lambda f: f < 1}  # rolled back from here
        arms = [
            arm
            for arm in probe.get("arms") or []
            if not any(barred[action](arm["factor"]) for action in observation.avoid if action in barred)
        ]
        if not arms:
            why = probe.get("error") or "no probe was run"
            return Decision("keep", f"no evidence ({why}): keep")
        keep = next((arm for arm in arms if arm["factor"] == 1.0), None)
        finite = [arm for arm in arms if math.isfinite(arm_loss(arm, "estimate"))]
        if not finite:
            low = min(arm["factor"] for arm in arms)
            if low < 1:
                return Decision("halve", f"every probed lr diverged: x{low:g}", factor=low)
            return Decision("keep", "every probed lr diverged and none was lower: keep")
        # The extrapolation only ranks arms the measurement cannot tell apart: those whose measured loss is
        # within the margin of the best measured. (On tiny from lr 1.0, a nearly straight steep drop at x1
        # extrapolated far below a measured-better x0.5, and kept an lr that went on diverging.)
        best_final = min(arm_loss(arm, "final") for arm in finite)
        credible = [
            arm for arm in finite if arm_loss(arm, "final") <= best_final + self.margin * abs(best_final)
        ]
        best = min(credible, key=lambda arm: arm_loss(arm, "estimate"))
        estimate = arm_loss(best, "estimate")
        horizon = probe.get("horizon")
        if keep is None or not math.isfinite(arm_loss(keep, "estimate")):
            return self._move(
                best, f"the lr in force diverged in the probe; x{best['factor']:g} reached {estimate:.3f}"
            )
        if keep not in credible:
            return self._move(
                best,
                f"probe: x{best['factor']:g} measured {arm_loss(best, 'final'):.3f} after {probe.get('steps')}"
                f" steps against {arm_loss(keep, 'final'):.3f} at x1",
            )
        base = arm_loss(keep, "estimate")
        gain = (base - estimate) / abs(base) if base else 0.0
        if best is keep or gain <= self.margin:
            return Decision(
                "keep",
                f"probe: no lr beats the current one by over {100 * self.margin:g}% at {horizon} steps"
                f" (x1 {base:.3f}; best other {self._runner_up(finite, keep)})",
            )
        return self._move(
            best,
            f"probe: x{best['factor']:g} reaches {estimate:.3f} at {horizon} steps against {base:.3f} at x1"
            f" ({100 * gain:.1f}% lower)",
        )

    @staticmethod
    def _move(arm: dict, why: str) -> Decision:
        factor = arm["factor"]
        if factor == 1.0:
            return Decision("keep", why)
        return Decision("double" if factor > 1 else "halve", why, factor=factor)

    @staticmethod
    def _runner_up(arms: list[dict], keep: dict) -> str:
        others = [arm for arm in arms if arm is not keep]
        if not others:
            return "none"
        arm = min(others, key=lambda a: arm_loss(a, "estimate"))
        return f"x{arm['factor']:g} {arm_loss(arm, 'estimate'):.3f}"


class VettedProbeSupervisor(ProbeSupervisor):
    """`probe-llm`: the probe proposes, a chat model confirms or vetoes. A proposal to keep stands without
    a call; otherwise the model reads the run's relative signals and the probe's table (prompt
    `probe_veto`) and answers: the proposed action confirms it (with the probe's measured factor), any
    other answer vetoes it (keep). A model that gives no valid answer leaves the measured proposal."""

    name = "probe-llm"

    uses_chat_model = True

    @classmethod
    def from_options(cls, *, chat_model=None, strategy: str | None = None, option: str | None = None):
        """`probe-llm:STRATEGY` picks the veto's prompt (default probe_veto; the caller's --strategy, made
        for `llm`, is not one)."""
        return cls(chat_model or embedded_chat_model(), option or "probe_veto")

    def __init__(self, chat_model, strategy: str = "probe_veto", **probe_options):
        super().__init__(**probe_options)
        self.llm = LLMSupervisor(chat_model, strategy)
        self.strategy, self.model = self.llm.strategy, self.llm.model

    def decide(self, observation: Observation) -> Decision:
        proposal = super().decide(observation)
        if proposal.action == "keep":
            return proposal
        answer = self.llm.decide(observation)  # raises when the model gives no answer: see `fallback`
        if answer.fallback:
            return self._stands(proposal, answer.raw_output, answer.latency_s)
        if answer.action == proposal.action:
            why = f"{proposal.explanation}; confirmed: {answer.explanation}"
            return Decision(
                proposal.action, why, answer.raw_output, latency_s=answer.latency_s, factor=proposal.factor
            )
        why = f"vetoed x{proposal.factor:g} ({answer.action}): {answer.explanation} [{proposal.explanation}]"
        return Decision("keep", why, answer.raw_output, latency_s=answer.latency_s)

    def fallback(self, observation: Observation, error: BaseException) -> Decision:
        """The model gave no answer (once the loop's retries were spent): the measured proposal stands."""
        try:
            proposal = super().decide(observation)
        except Exception:  # noqa: BLE001 - no proposal either: the safe action
            return super().fallback(observation, error)
        if proposal.action == "keep":
            return proposal
        return self._stands(proposal, getattr(error, "raw_output", None))

    @staticmethod
    def _stands(proposal: Decision, raw_output: str | None, latency_s: float = 0.0) -> Decision:
        why = f"{proposal.explanation}; the model gave no valid answer, so the measured proposal stands"
        return Decision(proposal.action, why, raw_output, True, latency_s, factor=proposal.factor)
