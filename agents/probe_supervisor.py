"""The `probe` supervisor: decides from evidence, not from the look of a loss curve.

Before each decision the loop runs a `probe` (trainer_bridge/probe.py): from an exact snapshot of the
run, the lr in force and a candidate multiple of it each train a few steps on the same batches, and each
arm's eval-slice loss is extrapolated to the horizon. Among the arms whose measured loss is within
`margin` (relative) of the best measured, the one with the lowest estimate wins, if it beats the x1 arm's
estimate by more than `margin`, or if x1's measured loss is not among them; otherwise keep. The
extrapolation counters short-horizon bias (measured alone, 4 steps never showed a 100x too low lr on tiny
a 1% gain), and the measurement keeps it from overruling a clear result. A classical proposer: no model,
no absolute lr, so nothing to learn about a workload's lr scale, and nothing that fails to transfer.

Which multiple is probed (`directed`, the default): the update alignment (the hypergradient's sign)
proposes a direction, x2 when successive steps agree, x0.5 when they oppose; a lowering that won is
followed by another try lower, and a raise that won, while the alignment still agrees, by one twice as
large (x2, x4, x8: `max_raise`). Short-horizon bias makes a probe timid about raising (a few steps at a
higher lr rarely show its gain), so a start 100x too low needs large raises; a lower lr's gain from a too
high one shows at once, so lowering is never escalated. With no alignment logged, both directions are
probed. `directed=False` probes every factor every time (the 3-arm probe of docs/lr-suite-probe).

A measured restart (`restart`, x1/16 by default): at the first decision, when the probe proposes to
lower, one more arm trains from the run's start with the whole schedule at that multiple, as many steps as
the run has done (where the run keeps its start: `BridgeConfig.keep_start`, by default for models of at
most 50M trained parameters). Equal steps, so its loss
compares with the run's now as measured, no extrapolation. If it is lower by more than `margin`, the run
goes on from that arm's state (a new branch): a start far too high does its damage before the first
evaluation, and no later lowering undoes it (docs/lr-suite-probe). A start that is not too high never
pays for it unless the alignment proposes lowering, and then a much lower start measures worse.

What it may cost (`budget`): the probes' optimizer steps as a share of the run's, 0.5 by default (a run
costs at most 1.5x a static one). The steps per arm are the budget spread over the run's decisions, at
most `steps`; where that leaves fewer than 2 per arm, only every k-th decision is probed. The lr-suite
counts the cost in `compute_steps`, and each probe is journaled with its `cost_steps`. A restart arm's
steps come out of the budget too: the later probes have that much less.
"""

from __future__ import annotations

import math

from selfsteer.agents.observation import Observation, arm_loss
from selfsteer.agents.supervisors import Decision, LLMSupervisor, Supervisor, embedded_chat_model

MIN_ARM_STEPS = 2  # a start, a halfway and an end point: the least an extrapolation is fitted to


class ProbeSupervisor(Supervisor):
    """factors: the multiples of the lr probed (1 is always among them: the arm to beat); directed probes
    use the lowest and the highest. steps: optimizer steps per arm, at most. margin: how much lower
    (relative) the winner's estimate must be. horizon: the steps each arm is extrapolated to; default
    twice the interval between evaluations (the decision's effect lasts at least until the next one), at
    most the steps left. budget: the probes' steps as a share of the run's (None: no limit, `steps` per
    arm). directed: probe x1 and one direction (above); False, every factor. max_raise: the largest
    escalated raise. restart: the multiple of the whole schedule a restart arm tries from the start at
    the first decision (None: never).

    A run of unknown length (no `max_steps` in the observation: a plain loop that never said) cannot be
    budgeted: each probe trains `steps` an arm there.

    It remembers its own last moves (to escalate), per run: a decision at or before one it remembers (a
    new run, or a rollback) forgets those after it."""

    name = "probe"
    strategy = "probe"

    @classmethod
    def from_options(cls, *, chat_model=None, strategy: str | None = None, option: str | None = None):
        """`probe:full`: every factor at every decision, 4 steps an arm, no budget (the probe measured in
        docs/lr-suite-probe before the budget)."""
        if option == "full":
            return cls(directed=False, budget=None)
        if option is not None:
            raise ValueError(f"unknown probe option {option!r}: probe or probe:full")
        return cls()

    def __init__(
        self,
        factors: tuple[float, ...] = (0.5, 1.0, 2.0),
        steps: int = 4,
        margin: float = 0.01,
        horizon: int | None = None,
        budget: float | None = 0.5,
        directed: bool = True,
        max_raise: float = 8.0,
        restart: float | None = 1 / 16,
    ):
        if 1.0 not in factors:
            factors = (*factors, 1.0)
        if budget is not None and budget <= 0:
            raise ValueError(f"budget is a share of the run's steps, above 0: {budget}")
        self.factors = tuple(sorted(factors))
        self.steps = steps
        self.margin = margin
        self.horizon = horizon
        self.budget = budget
        self.directed = directed
        self.max_raise = max_raise
        self.restart = restart
        self._moves: dict[int, float] = {}  # decision step -> the factor applied (1: keep)
        self._restart_cost = 0  # optimizer steps the run's restart arm took out of the budget
        self._unprobed = "no probe was run"  # why evidence() asked for none, for the decision to say

    def evidence(self, observation: Observation) -> dict | None:
        self._moves = {step: f for step, f in self._moves.items() if step < observation.step}
        self._unprobed = "no probe was run"
        interval = observation.eval_interval()
        interval = max(2 * self.steps if interval is None else interval, 1)
        horizon = self.horizon or 2 * interval
        if observation.max_steps:
            horizon = min(horizon, observation.max_steps - observation.step)
        factors = self._candidates(observation)
        if factors == [1.0]:
            return None  # both ways rolled back from here: nothing to measure
        first = not self._moves and len(observation.eval_loss) == 1
        lowering = factors[0] < 1 and factors[-1] == 1.0  # the probe proposes to lower, and only that
        restart = (
            self.restart is not None
            and observation.start_kept
            and first
            and lowering
            and "halve" not in observation.avoid
        )
        if first:
            self._restart_cost = observation.step if restart else 0
        steps = self.steps
        if self.budget is not None and observation.max_steps:
            decisions = max(1, (observation.max_steps - 1) // interval)
            allowance = (self.budget * observation.max_steps - self._restart_cost) / decisions  # per decision
            steps = min(self.steps, int(allowance // len(factors)))
            if steps < MIN_ARM_STEPS:
                every = math.ceil(MIN_ARM_STEPS * len(factors) / allowance)
                if (observation.step // interval - 1) % every:
                    self._unprobed = f"within the budget, one decision in {every} is probed"
                    return None  # this decision keeps
                steps = min(self.steps, MIN_ARM_STEPS)
        wanted = {"factors": factors, "steps": steps, "horizon": max(horizon, steps)}
        return {**wanted, "restart": [self.restart]} if restart else wanted

    def _candidates(self, observation: Observation) -> list[float]:
        if not self.directed:
            return list(self.factors)
        lower, higher = self.factors[0], self.factors[-1]
        open_ways = [
            f for action, f in (("halve", lower), ("double", higher)) if action not in observation.avoid
        ]
        if len(open_ways) < 2:  # self-correction's retry: the way rolled back from here is not probed again
            return sorted([*open_ways, 1.0])
        last = self._moves[max(self._moves)] if self._moves else 1.0
        alignment = observation.mean_alignment()
        if last < 1:
            return [lower, 1.0]  # lowering won: lower still, until x1 holds
        if alignment is None:
            return list(self.factors)
        if alignment <= 0:
            return [lower, 1.0]
        raise_by = min(self.max_raise, higher * last) if last > 1 else higher
        return [1.0, raise_by]

    def decide(self, observation: Observation) -> Decision:
        return self._remember(observation, self._decide(observation))

    def _remember(self, observation: Observation, decision: Decision) -> Decision:
        self._moves[observation.step] = decision.apply(1.0)  # the factor applied (1: keep)
        return decision

    def _decide(self, observation: Observation) -> Decision:
        probe = observation.probe or {}
        barred = {"double": lambda f: f > 1, "halve": lambda f: f < 1}  # rolled back from here
        arms = [
            arm
            for arm in probe.get("arms") or []
            if not any(barred[action](arm["factor"]) for action in observation.avoid if action in barred)
        ]
        if not arms:
            why = probe.get("error") or self._unprobed
            return Decision("keep", f"no evidence ({why}): keep")
        restart = self._restart(probe) if "halve" not in observation.avoid else None
        if restart is not None:
            return restart
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
                best,
                f"the lr in force diverged in the probe; x{best['factor']:g} reached {estimate:.3f}",
                probe.get("lr"),
            )
        if keep not in credible:
            return self._move(
                best,
                f"probe: x{best['factor']:g} measured {arm_loss(best, 'final'):.3f} after {probe.get('steps')}"
                f" steps against {arm_loss(keep, 'final'):.3f} at x1",
                probe.get("lr"),
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
            probe.get("lr"),
        )

    def _restart(self, probe: dict) -> Decision | None:
        """The restart arm that measured lower than the run now (by more than the margin), as a move."""
        now = probe.get("start")
        arms = [arm for arm in probe.get("restarts") or [] if math.isfinite(arm_loss(arm, "final"))]
        if not arms or now is None or not probe.get("lr"):
            return None
        best = min(arms, key=lambda arm: arm_loss(arm, "final"))
        if arm_loss(best, "final") >= now * (1 - self.margin):
            return None
        factor = best["lr"] / probe["lr"]
        if factor >= 1:
            return None
        why = (
            f"restart: trained from the start at x{best['factor']:g} for the same {probe.get('step')} steps, the"
            f" loss is {arm_loss(best, 'final'):.3f} against {now:.3f} now: go on from there"
        )
        return Decision("halve", why, factor=factor, restart=best["checkpoint"])

    @staticmethod
    def _move(arm: dict, why: str, lr: float | None) -> Decision:
        """The arm's move; where the bounds clamped its lr (a run above them), the factor it measured."""
        factor = arm["factor"]
        if lr and arm.get("lr") and not math.isclose(arm["lr"], lr * factor, rel_tol=1e-9):
            factor = arm["lr"] / lr
            why = f"{why} (at the lr bound {arm['lr']:g}: x{factor:.3g})"
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
        return self._remember(observation, self._vetted(observation))

    def _vetted(self, observation: Observation) -> Decision:
        proposal = self._decide(observation)
        if proposal.action == "keep":
            return proposal
        answer = self.llm.decide(observation)  # raises when the model gives no answer: see `fallback`
        if answer.fallback:
            return self._stands(proposal, answer.raw_output, answer.latency_s)
        if answer.action == proposal.action:
            why = f"{proposal.explanation}; confirmed: {answer.explanation}"
            return Decision(
                proposal.action,
                why,
                answer.raw_output,
                latency_s=answer.latency_s,
                factor=proposal.factor,
                restart=proposal.restart,
            )
        why = f"vetoed x{proposal.factor:g} ({answer.action}): {answer.explanation} [{proposal.explanation}]"
        return Decision("keep", why, answer.raw_output, latency_s=answer.latency_s)

    def fallback(self, observation: Observation, error: BaseException) -> Decision:
        """The model gave no answer (once the loop's retries were spent): the measured proposal stands."""
        try:
            proposal = self._decide(observation)
        except Exception:  # noqa: BLE001 - no proposal either: the safe action
            return self._remember(observation, super().fallback(observation, error))
        if proposal.action == "keep":
            return self._remember(observation, proposal)
        return self._remember(observation, self._stands(proposal, getattr(error, "raw_output", None)))

    @staticmethod
    def _stands(proposal: Decision, raw_output: str | None, latency_s: float = 0.0) -> Decision:
        why = f"{proposal.explanation}; the model gave no valid answer, so the measured proposal stands"
        return Decision(
            proposal.action,
            why,
            raw_output,
            True,
            latency_s,
            factor=proposal.factor,
            restart=proposal.restart,
        )
