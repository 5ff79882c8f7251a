"""Experimental probe variants (issue 25, compute <= 1.5x), run on tiny and small only (docs/lr-suite-probe).
Each starts from the 3-arm probe (`directed=False, budget=None`: what ProbeSupervisor was when they ran)."""

from selfsteer.agents.hypergradient_supervisor import HypergradientSupervisor
from selfsteer.agents.probe_supervisor import ProbeSupervisor


class Directed3(ProbeSupervisor):
    """x1 and the direction the update alignment points to; 3 steps an arm."""

    name = "directed3"
    arm_steps = 3

    def __init__(self):
        super().__init__(steps=self.arm_steps, directed=False, budget=None)

    def evidence(self, observation):
        wanted = super().evidence(observation)
        mean = observation.mean_alignment()
        if mean is not None:
            wanted["factors"] = [1.0, 2.0] if mean > 0 else [0.5, 1.0]
        return wanted


class Directed4(Directed3):
    name = "directed4"
    arm_steps = 4


class FirstTwo(ProbeSupervisor):
    """the full probe at the first two decisions, the hypergradient after."""

    name = "firsttwo"

    def __init__(self):
        super().__init__(directed=False, budget=None)
        self.hg = HypergradientSupervisor()

    def _late(self, observation):
        return len(observation.eval_loss) > 2

    def evidence(self, observation):
        return None if self._late(observation) else super().evidence(observation)

    def decide(self, observation):
        return self.hg.decide(observation) if self._late(observation) else super().decide(observation)


class Escalating3(Directed3):
    """Directed3, and a move that follows a move the same way is twice as large (x2, x4, x8)."""

    name = "escalating3"
    cap = 8.0

    def __init__(self):
        super().__init__()
        self._last = None  # (step, factor applied)

    def evidence(self, observation):
        wanted = super().evidence(observation)
        if self._last is not None and self._last[0] >= observation.step:
            self._last = None
        mean = observation.mean_alignment()
        if mean is not None and self._last is not None:
            last = self._last[1]
            if mean > 0 and last > 1:
                wanted["factors"] = [1.0, min(self.cap, 2 * last)]
            elif mean <= 0 and last < 1:
                wanted["factors"] = [max(1 / self.cap, last / 2), 1.0]
        return wanted

    def decide(self, observation):
        decision = super().decide(observation)
        self._last = (
            observation.step,
            decision.factor if decision.action != "keep" and decision.factor else 1.0,
        )
        return decision


class Escalating4(Escalating3):
    name = "escalating4"
    arm_steps = 4


class EscalatingUp3(Escalating3):
    """escalates upward moves only: short-horizon bias makes a probe timid about raising the lr, while a
    lower lr's gain from a too-high one shows at once."""

    name = "escalatingup3"

    def evidence(self, observation):
        wanted = super().evidence(observation)
        if min(wanted["factors"]) < 0.5:
            wanted["factors"] = [0.5, 1.0]
        return wanted


class MomentumUp3(EscalatingUp3):
    """the direction of the last move while moves win; the alignment's sign otherwise."""

    name = "momentumup3"

    def evidence(self, observation):
        wanted = super().evidence(observation)
        if self._last is not None and self._last[1] < 1:
            wanted["factors"] = [0.5, 1.0]
        return wanted
