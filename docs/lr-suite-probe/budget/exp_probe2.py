"""A raise that agreeing steps propose stands unless the probe measures it worse."""

import math

from selfsteer.agents.observation import arm_loss
from selfsteer.agents.probe_supervisor import ProbeSupervisor


class RaiseUnlessWorse(ProbeSupervisor):
    raise_above = 0.05

    def _decide(self, observation):
        decision = super()._decide(observation)
        if decision.action != "keep":
            return decision
        alignment = observation.mean_alignment()
        arms = (observation.probe or {}).get("arms") or []
        keep = next((a for a in arms if a["factor"] == 1.0), None)
        ups = [a for a in arms if a["factor"] > 1 and math.isfinite(arm_loss(a, "final"))]
        if (
            alignment is None
            or alignment <= self.raise_above
            or keep is None
            or not ups
            or "double" in observation.avoid
        ):
            return decision
        up = ups[0]
        if arm_loss(up, "final") <= arm_loss(keep, "final") * (1 + self.margin):
            return self._move(
                up, f"agreeing steps (alignment {alignment:+.3f}) and x{up['factor']:g} not measured worse"
            )
        return decision
