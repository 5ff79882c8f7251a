"""A tiny supervised run for self-correction tests: it waits after each evaluation for the supervisor,
which pauses it while deciding, so the path does not depend on how fast either side is."""

from __future__ import annotations

from selfsteer.agents.observation import Observation
from selfsteer.agents.supervisors import Decision, Supervisor
from selfsteer.graphs.supervise import SelfCorrection, run_supervision
from selfsteer.trainer_bridge.recipe import load_recipe
from selfsteer.trainer_bridge.runner import RecipeRun


class AlwaysDouble(Supervisor):
    """Doubles whatever it sees (as the untrained embedded model does); remembers what it was shown."""

    name = "always-double"

    def __init__(self):
        self.seen: list[Observation] = []

    def decide(self, observation):
        self.seen.append(observation)
        return Decision("double", "scripted: always double")


def supervised_run(tmp_path, supervisor, lr: float, self_correct: SelfCorrection | None, **loop):
    """A tiny run of 60 steps (eval every 10) that waits after each evaluation for the supervisor,
    which pauses the run while it decides; `loop`: more options of run_supervision."""
    db = tmp_path / "selfsteer.sqlite"
    final = {}

    def supervise(control, stop):
        final.update(
            run_supervision(
                control,
                supervisor,
                db=str(db),
                stop_event=stop,
                pause_while_deciding=True,
                self_correct=self_correct,
                **loop,
            )
        )

    recipe = load_recipe("tiny", [f"training.learning_rate={lr:e}", "training.max_steps=60"])
    run = RecipeRun(
        recipe, out_dir=tmp_path / "out", db=db, port=0, supervisor=supervise, hold_for_supervisor=True
    )
    try:
        summary = run.train()
    finally:
        run.close()
    return summary, final, db
