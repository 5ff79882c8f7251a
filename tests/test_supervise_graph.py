"""The supervision graph on real tiny training runs behind a real control server. The supervisors
here are scripted (a list of actions) so that the path the graph takes is known in advance."""

import threading

import pytest
from helpers.live_run import LiveRun
from helpers.polling import wait_for
from langgraph.checkpoint.sqlite import SqliteSaver

from selfsteer.agents.supervisors import Decision, RuleSupervisor, Supervisor
from selfsteer.graphs.supervise import SupervisionContext, run_supervision, supervision_graph
from selfsteer.tools.bridge_tools import BridgeTools
from selfsteer.trainer_bridge.client import BridgeClient
from selfsteer.trainer_bridge.store import Store


class Scripted(Supervisor):
    name = "scripted"

    def __init__(self, actions):
        self.actions = list(actions)
        self.seen = []

    def decide(self, observation):
        self.seen.append(observation.step)
        return Decision(self.actions.pop(0) if self.actions else "keep", "scripted")


def test_graph_observes_decides_and_acts_after_each_evaluation(tmp_path):
    supervisor = Scripted(["double", "halve", "keep"])
    told = []
    with LiveRun(tmp_path, ["training.max_steps=40"], gates=[11, 21, 31]) as live, Store(live.db) as store:
        # Attached by URL alone: its own state goes elsewhere, its decisions to the run's store via the server.
        kwargs = {"db": str(tmp_path / "supervisor.sqlite"), "on_decision": told.append}
        thread = threading.Thread(
            target=run_supervision, args=(live.run.url, supervisor), kwargs=kwargs, daemon=True
        )
        thread.start()
        # Training waits at step 11 (the step-10 evaluation is done) for the first decision, at step 21
        # for the second, at step 31 for the third: the path does not depend on how fast either side is.
        for gate, decisions in ((11, 1), (21, 2), (31, 3)):
            live.gate.wait(gate)
            wait_for(lambda n=decisions: len(store.list_decisions()) >= n)
            live.gate.release(gate)
        summary = live.join()
        thread.join(60)
        assert not thread.is_alive()
        decisions = store.list_decisions(live.run.run_id)
        commands = [c for c in store.list_commands(live.run.run_id) if c["type"] == "set_optimizer"]

    assert [d["action"] for d in decisions][:3] == ["double", "halve", "keep"]
    assert [(d["step"], d["action"], d["lr_after"]) for d in told] == [
        (d["step"], d["action"], d["lr_after"]) for d in decisions
    ]
    with Store(tmp_path / "supervisor.sqlite") as own:
        assert own.list_decisions() == []  # nothing of the run's is kept beside the supervisor
    assert decisions[0]["lr_before"] == pytest.approx(3e-3) and decisions[0]["lr_after"] == pytest.approx(
        6e-3
    )
    assert decisions[1]["lr_before"] == pytest.approx(6e-3) and decisions[1]["lr_after"] == pytest.approx(
        3e-3
    )
    assert [c["source"] for c in commands] == ["scripted", "scripted"]
    run_id = live.run.run_id  # keyed by run, supervisor instance (the graph's thread) and iteration
    assert [c["idempotency_key"] for c in commands] == [f"{run_id}/supervise:{run_id}/{i}/lr" for i in (1, 2)]
    assert [d["key"] for d in decisions[:3]] == [
        f"{run_id}/supervise:{run_id}/{i}/decision" for i in (1, 2, 3)
    ]
    assert [c["args"]["lr"] for c in commands] == pytest.approx([6e-3, 3e-3])
    assert all(c["status"] == "success" for c in commands)
    assert decisions[0]["outcome"] is not None and "steps" in decisions[0]["outcome"]
    assert [d["observation"]["eval_loss"][-1][0] for d in decisions[:3]] == [10, 20, 30]  # one per evaluation
    assert summary["steps"] == 40


def sent_or_kept(store, run_id):
    decisions = store.list_decisions(run_id)
    if not decisions:
        return False
    return decisions[0]["action"] == "keep" or any(
        c["type"] == "set_optimizer" for c in store.list_commands(run_id)
    )


def test_rule_supervisor_halves_a_run_whose_learning_rate_is_far_too_high(tmp_path):
    # At lr 2.0 the tiny model's loss explodes from ~5.5 to ~190 by step 10, then drifts back down.
    overrides = ["training.max_steps=40", "training.learning_rate=2.0"]
    with LiveRun(tmp_path, overrides, gates=[11, 21, 31]) as live, Store(live.db) as store:
        thread = threading.Thread(
            target=run_supervision,
            args=(live.run.url, RuleSupervisor()),
            kwargs={"db": str(live.db)},
            daemon=True,
        )
        thread.start()
        # Held at 11 until the first decision's lr command (if it changes the lr) is journaled, so that
        # it lands at step 11 whatever the speed of either side.
        live.gate.wait(11)
        wait_for(lambda: sent_or_kept(store, live.run.run_id))
        live.gate.release(11)
        for gate in (21, 31):
            live.gate.wait(gate)
            wait_for(lambda gate=gate: any(d["step"] >= gate - 1 for d in store.list_decisions()))
            live.gate.release(gate)
        live.join()
        thread.join(60)
        decisions = store.list_decisions(live.run.run_id)
        commands = {c["uuid"]: c for c in store.list_commands(live.run.run_id)}

    first = decisions[0]
    # The first decision reads the step-10 evaluation, the first one after the explosion.
    assert first["observation"]["eval_loss"][-1][0] == 10
    assert first["observation"]["eval_loss"][-1][1] > 1.5 * first["observation"]["train_loss"][0][1]
    assert first["action"] == "halve" and "exploded" in first["explanation"]
    assert first["lr_before"] == pytest.approx(2.0) and first["lr_after"] == pytest.approx(1.0)
    command = commands[first["command"]]
    assert command["type"] == "set_optimizer" and command["status"] == "success"
    assert command["args"]["lr"] == pytest.approx(first["lr_after"])
    assert command["step"] == first["applied_step"] == 11
    assert command["result"]["before"]["lr"] == pytest.approx(2.0)
    assert command["result"]["after"]["lr"] == pytest.approx(1.0)
    # The optimizer really stepped at 2.0 up to the applied step and at 1.0 right after it.
    assert live.recorder.lr[11] == pytest.approx(2.0) and live.recorder.lr[12] == pytest.approx(1.0)


def test_a_supervisor_that_dies_resumes_without_acting_twice(tmp_path):
    class DiesAfterSending(BridgeTools):
        died = False

        def set_lr(self, lr, idempotency_key=None):
            row = super().set_lr(lr, idempotency_key)
            if not DiesAfterSending.died:
                DiesAfterSending.died = True
                raise RuntimeError("the supervisor process died")
            return row

    config = {"configurable": {"thread_id": "crash-test"}}
    with LiveRun(tmp_path, ["training.max_steps=20"], gates=[5]) as live, Store(live.db) as store:
        live.gate.wait(5)
        with SqliteSaver.from_conn_string(str(tmp_path / "graph.sqlite")) as saver:
            client = BridgeClient(live.run.url, source="scripted")
            graph = supervision_graph(saver)
            context = SupervisionContext(DiesAfterSending(client), Scripted(["halve"]), wait_timeout_s=0.5)
            with pytest.raises(RuntimeError, match="died"):
                graph.invoke({"max_iterations": 1}, config, context=context)
            # A new process: a new graph, new tools and a new supervisor, the same checkpoint thread.
            graph = supervision_graph(saver)
            context = SupervisionContext(DiesAfterSending(client), Scripted(["double"]), wait_timeout_s=0.5)
            assert graph.get_state(config).next == ("act",)
            final = graph.invoke(None, config, context=context)
            client.close()
        live.gate.release(5)
        live.join()
        commands = [c for c in store.list_commands(live.run.run_id) if c["type"] == "set_optimizer"]
        decisions = store.list_decisions(live.run.run_id)
    assert final["iteration"] == 1
    assert len(commands) == 1 and commands[0]["args"]["lr"] == pytest.approx(1.5e-3)
    assert [d["action"] for d in decisions] == ["halve"]  # decided once, not again after the crash


def test_a_person_decides_through_an_interrupt(tmp_path):
    from selfsteer.agents.supervisors import HumanSupervisor

    questions = []

    def ask(question):
        questions.append(question)
        return {"action": "halve", "explanation": "too fast for my taste"}

    with LiveRun(tmp_path, ["training.max_steps=20"], gates=[11]) as live, Store(live.db) as store:
        thread = threading.Thread(
            target=run_supervision,
            args=(live.run.url, HumanSupervisor()),
            kwargs={"db": str(live.db), "ask_human": ask, "max_iterations": 1},
            daemon=True,
        )
        thread.start()
        live.gate.wait(11)
        wait_for(lambda: len(store.list_decisions()) >= 1)
        live.gate.release(11)
        live.join()
        thread.join(30)
        (decision,) = store.list_decisions(live.run.run_id)
        (command,) = [c for c in store.list_commands(live.run.run_id) if c["type"] == "set_optimizer"]
    assert questions and "double, halve or keep" in questions[0]["question"]
    assert (decision["agent"], decision["action"], decision["explanation"]) == (
        "human",
        "halve",
        "too fast for my taste",
    )
    assert command["source"] == "human" and command["idempotency_key"].endswith("/1/lr")
    assert command["args"]["lr"] == pytest.approx(1.5e-3)


def test_a_supervisor_sees_only_the_history_of_the_branch_it_steers():
    from selfsteer.trainer_bridge.store.runs import lineage

    def rows(branch, steps):
        return [{"step": step, "name": "loss", "value": 1.0, "branch": branch} for step in steps]

    branches = [
        {"name": "main", "parent": None, "checkpoint_step": 0, "fork_step": 0},
        # a checkpoint of step 20 loaded at step 30: main's steps 21-30 are not behind `a`
        {"name": "a", "parent": "main", "checkpoint_step": 20, "fork_step": 30},
        {"name": "b", "parent": "a", "checkpoint_step": 35, "fork_step": 40},  # resumed from a's step 35
    ]
    history = rows("main", range(1, 31)) + rows("a", range(31, 41)) + rows("b", range(36, 50))
    seen = [(r["branch"], r["step"]) for r in lineage(history, branches, "b")]
    assert seen == [("main", s) for s in range(1, 21)] + [("a", s) for s in range(31, 36)] + [
        ("b", s) for s in range(36, 50)
    ]
    assert lineage(history, branches, "main") == rows("main", range(1, 31))


class AlwaysDouble(Supervisor):
    name = "always-double"

    def decide(self, observation):
        return Decision("double", "scripted")


def test_paused_decisions_act_on_the_step_they_saw_and_stay_within_the_lr_bounds(tmp_path):
    overrides = ["training.max_steps=300", "training.eval_steps=5", "training.learning_rate=0.4"]
    with LiveRun(tmp_path, overrides) as live, Store(live.db) as store:
        run_supervision(live.run.url, AlwaysDouble(), db=str(live.db), pause_while_deciding=True)
        summary = live.join()
        decisions = store.list_decisions(live.run.run_id)
        commands = store.list_commands(live.run.run_id)
    assert summary["steps"] == 300  # never left paused, never refused
    assert [d["lr_after"] for d in decisions[:3]] == pytest.approx([0.8, 1.0, 1.0])  # 1.6 is over the bound
    # A pause sent as the run takes its last step arrives too late: journaled failed, and the loop ends.
    if commands[-1]["status"] == "failed":
        assert commands[-1]["type"] == "pause" and commands[-1]["error"].startswith("the run ended")
        commands = commands[:-1]
    assert all(c["status"] == "success" for c in commands)
    by_key = {c["idempotency_key"]: c for c in commands if c["idempotency_key"]}
    for i, decision in enumerate(decisions, start=1):
        prefix = decision["key"].removesuffix("decision")
        assert by_key[prefix + "resume"]["step"] == decision["step"] == by_key[prefix + "pause"]["step"], i
        if decision["lr_after"] == decision["lr_before"]:  # a double at the bound changes nothing: no command
            assert prefix + "lr" not in by_key, i
        else:  # paused before observing: the decision saw the very step at which its lr change took effect
            assert by_key[prefix + "lr"]["step"] == decision["step"], i


def test_a_failing_action_still_resumes_the_paused_run(tmp_path):
    from selfsteer.trainer_bridge.client import BridgeHTTPError

    class Refused(BridgeTools):
        def set_lr(self, lr, idempotency_key=None):
            raise BridgeHTTPError(500, "the server fell over")

    with (
        LiveRun(tmp_path, ["training.max_steps=100000", "training.eval_steps=5"]) as live,
        Store(live.db) as store,
    ):
        client = BridgeClient(live.run.url, source="scripted")
        context = SupervisionContext(Refused(client), AlwaysDouble(), pause_while_deciding=True)
        with pytest.raises(BridgeHTTPError, match="fell over"):
            supervision_graph().invoke(
                {"max_iterations": 3}, {"configurable": {"thread_id": "t"}}, context=context
            )
        step = client.state()["step"]
        wait_for(lambda: client.state()["step"] > step + 5)  # it trains on: the pause was undone
        client.stop()
        client.close()
        live.join()
        commands = store.list_commands(live.run.run_id)
    assert [(c["type"], c["status"]) for c in commands if c["source"] == "scripted"] == [
        ("pause", "success"),
        ("resume", "success"),
        ("stop", "success"),
    ]


def test_selfsteer_supervise_needs_only_the_url_and_prints_each_decision(tmp_path):
    """The command line, attached from another folder: its decisions land in the run's store through
    the run's server, and each is printed as it is made."""
    import subprocess
    import sys

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with LiveRun(tmp_path, ["training.max_steps=30"], gates=[11, 21]) as live, Store(live.db) as store:
        command = [sys.executable, "-m", "selfsteer.cli.main", "supervise", "--url", live.run.url,
                   "--supervisor", "rule", "--max-iterations", "2"]  # the supervise command as typed # fmt: skip
        supervisor = subprocess.Popen(
            command, cwd=elsewhere, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for gate, decisions in ((11, 1), (21, 2)):
            live.gate.wait(gate)
            wait_for(lambda n=decisions: len(store.list_decisions(live.run.run_id)) >= n, timeout=120)
            live.gate.release(gate)
        out, err = supervisor.communicate(timeout=120)
        live.join()
        decisions = store.list_decisions(live.run.run_id)
    assert supervisor.returncode == 0, err[-2000:]
    printed = [line for line in out.splitlines() if line.startswith("step ")]
    assert printed == [
        f"step {d['step']}: {d['action']}, lr {d['lr_before']:.3g} -> {d['lr_after']:.3g}: {d['explanation']}"
        for d in decisions
    ]
    assert len(printed) == 2 and "done after 2 decisions" in out
    assert {p.name.split("-")[0] for p in elsewhere.iterdir()} == {
        "selfsteer.sqlite"
    }  # the loop's own state only


def test_decide_alone_falls_back_keeps_what_was_rolled_back_and_stays_within_the_lr_bounds():
    """A node is a function of the state, the config and the run's context: called here with no run at
    all (no run id, so nothing is recorded and no tool is used)."""
    from langgraph.runtime import Runtime

    from selfsteer.agents.observation import Observation
    from selfsteer.graphs.supervise import SelfCorrection, after_check, decide
    from selfsteer.tools.bridge_tools import LR_BOUNDS

    class Broken(Supervisor):
        name = "broken"

        def decide(self, observation):
            raise RuntimeError("no answer")

    seen = Observation(step=20, lr=0.1, eval_loss=[(10, 3.0), (20, 2.5)]).to_dict()
    state = {"observation": seen, "lr": 0.1, "step": 20, "iteration": 4, "avoid": ["double"]}
    told = []

    def run(supervisor, **state_changes):
        context = SupervisionContext(None, supervisor, self_correct=SelfCorrection(), on_decision=told.append)
        return decide({**state, **state_changes}, {}, Runtime(context=context))

    failed = run(Broken())["decision"]
    assert (
        failed["action"] == "keep"
        and failed["fallback"]
        and "RuntimeError: no answer" in failed["explanation"]
    )
    barred = run(Scripted(["double"]))
    assert (
        barred["decision"]["action"] == "keep"
        and "double was rolled back" in barred["decision"]["explanation"]
    )
    assert barred["iteration"] == 5 and barred["avoid"] == [] and barred["decision_id"] is None
    at_bound = run(Scripted(["double"]), avoid=[], lr=LR_BOUNDS[1])["decision"]
    assert at_bound["action"] == "double" and at_bound["lr_after"] == LR_BOUNDS[1]
    # A run started above the bounds: a keep leaves its lr (it was journaled as the bound), a double does
    # not pull it down to the bound, a halve goes to the bound.
    above = 3 * LR_BOUNDS[1]
    for action, after in (("keep", above), ("double", above), ("halve", LR_BOUNDS[1])):
        assert run(Scripted([action]), avoid=[], lr=above)["decision"]["lr_after"] == after, action
    assert [d["action"] for d in told] == ["keep", "keep", "double", "keep", "double", "halve"]

    assert after_check({"awaiting_verdict": True}) == "wait"  # no new decision over an unjudged one
    assert after_check({"rolled_back": True}) == "observe"
    assert after_check({"rolled_back": False}) == "decide"


def test_an_evaluation_logged_after_the_observation_at_its_step_is_news_to_wait(tmp_path):
    """An observation at step 10 can come before step 10's evaluation is logged (the step counter moves
    first). That evaluation is news: `wait` must wake for it. It did not (it waited for one after step 10),
    and a run held after its evaluation for a decision then waited for the supervisor, the supervisor for
    the run, until the hold timed out: test_self_correct's every-steps test took 302 s in a fresh-clone CI
    run. Here the evaluation is already there: fixed, the wait returns at once with no news flag; broken,
    it is still waiting when the stop event ends it ({"finished": True})."""
    from langgraph.runtime import Runtime

    from selfsteer.graphs.supervise import wait

    with LiveRun(tmp_path, ["training.max_steps=100000", "training.eval_steps=10"], gates=[11]) as live:
        live.gate.wait(11)  # step 10's evaluation is logged; training holds at the end of step 11
        stop = threading.Event()
        context = SupervisionContext(BridgeTools(BridgeClient(live.run.url)), Scripted([]), stop_event=stop)
        state = {"step": 10, "observed_eval_step": 0, "awaiting_verdict": True}
        woke = {}
        waiting = threading.Thread(target=lambda: woke.update(wait(state, Runtime(context=context))))
        waiting.start()
        waiting.join(60)  # fixed, it returns at once; the bound keeps a broken wait from hanging
        stop.set()
        waiting.join(10)
        live.gate.release(11)
        live.client.stop()
        live.join()
    assert not waiting.is_alive() and woke == {}
