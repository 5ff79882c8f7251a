"""The supervision loop as a LangGraph state machine: wait -> observe -> [check ->] decide -> act -> wait ...

    wait      until the next evaluation (or `every_steps` steps), or the end of the run
    observe   metrics since the start (train and eval loss, lr, grad norm, step) from the control server;
              with pause_while_deciding the run is paused first, and stays paused until `act` is done
    check     (self-correction) the last decision that changed the lr is judged at the first evaluation
              after it (agents/self_correct.py). A failure is reflected on by the supervisor itself, then
              rolled back: the run loads the checkpoint saved just before the decision into a new branch
              (the abandoned one stays in the tree) and goes back to observe, so the decision is made
              again from the same state, with the reflection in context and the failed action barred.
              When a rollback would spend more than the budget of extra steps, the lr is set back instead.
    decide    the supervisor (LLM, rules, a person, your own class) looks and answers double/halve/keep
    act       the learning rate is changed through the bridge (only when the answer is not "keep");
              under self-correction a checkpoint is saved first: the rollback point

The loop ends when the run ends or after `max_iterations` decisions (LangGraph's recursion limit is
not a cap). With a checkpointer (`SqliteSaver`) the state is saved after every node, so a supervisor
process that dies resumes where it was, re-running the node it died in. Exactly once, nonetheless:
every command it sends (the lr change, and the pause/resume around a decision) carries an idempotency
key made of the run, the supervisor instance (the graph's thread id) and the iteration, so the server
returns the first command instead of queueing another; and a decision is stored under such a key
too, so a decision recorded before the crash is reused as it was, never asked for again.

    context = SupervisionContext(BridgeTools(BridgeClient(url)), RuleSupervisor())
    supervision_graph().invoke({"max_iterations": 50}, {"configurable": {"thread_id": "RUN"}}, context=context)

Each node is a function of the state, the run's config and `runtime.context` (a `SupervisionContext`:
the tools, the supervisor and the loop's settings), so each can be called alone.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict
from uuid import uuid4

import httpx
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.errors import GraphBubbleUp
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import Command, RetryPolicy

from selfsteer.agents.decision import ModelAnswerError
from selfsteer.agents.observation import Observation
from selfsteer.agents.reflector import reflecting
from selfsteer.agents.self_correct import MARGIN, factual_reflection, judge
from selfsteer.agents.supervisors import Decision, Supervisor, fall_back
from selfsteer.tools.bridge_tools import (
    LR_BOUNDS,
    BridgeClient,
    BridgeHTTPError,
    BridgeTools,
    CommandTimeout,
    RunControl,
    current_lr,
    sent_unless_over,
    trained_out,
)
from selfsteer.trainer_bridge.records import (
    ACTIONS,
    FINISHED_PHASES,
    DecisionUpdate,
    NewDecision,
    finite_or_null,
)
from selfsteer.trainer_bridge.store import DEFAULT_DB_PATH


class SupervisionState(TypedDict, total=False):
    max_iterations: int  # the cap on decisions
    every_steps: int  # decide at least this often when no evaluation comes (0: only after evaluations)
    iteration: int  # decisions made so far
    run_id: str
    max_steps: int  # the run's
    step: int  # the step of the latest observation
    lr: float
    observed_eval_step: int  # the step of the latest eval loss seen
    observations: int  # observations made so far: names the pause and resume around each
    observation: dict
    decision: dict
    decision_id: int | None
    sent_lr: dict | None  # the last learning-rate command: {uuid, lr}
    finished: bool
    # self-correction
    pending_check: dict | None  # the last lr change, awaiting its verdict (see `act`)
    avoid: list[str]  # actions rolled back from the state the next decision sees
    retry_of: int | None  # the rolled-back decision the next one is made in place of
    reflections: list[str]  # this run's reflections, oldest first
    rollbacks: int
    reverts: int  # failures set back without a rollback (over the budget of extra steps)
    extra_steps: int  # steps trained on branches that were abandoned
    rolled_back: bool  # the last check rolled the run back: observe again before deciding
    awaiting_verdict: bool  # the last check found no evaluation after the change took effect yet


@dataclass
class SelfCorrection:
    """Check, reflect, roll back and retry (see the module's docstring).

    margin: a decision failed when the eval loss after it rose more than this fraction (agents/self_correct.py).
    max_extra_steps: rollbacks may abandon at most this fraction of the run's max_steps in all; a failure
        past it is set back (the lr returns to what it was) without a rollback.
    memory: how many reflections (the latest) later decisions see.
    remember_runs: also show reflections of earlier runs of the same supervisor, from the store.
    reflector: who reflects on a failed decision and retries it: "self" (the supervisor itself),
        "shipped" (the trained reflector, agents/reflector/, and its actor, which retries among the
        actions not rolled back), "none" (the untrained embedded model in the reflector's place), or an
        adapter or model folder (agents/reflector.py `reflecting`). "self" by default: in the lr-suite
        the shipped reflector gained nothing on the held-out cells (docs/reflector/README.md).
    """

    margin: float = MARGIN
    max_extra_steps: float = 0.25
    memory: int = 3
    remember_runs: bool = False
    reflector: str = "self"

    def __post_init__(self):
        if not 0 <= self.margin < 10:
            raise ValueError(f"the self-correction margin must be a fraction >= 0, not {self.margin}")
        if not 0 <= self.max_extra_steps <= 1:
            raise ValueError(
                f"the self-correction budget must be a fraction in [0, 1], not {self.max_extra_steps}"
            )
        if self.memory < 0:
            raise ValueError(f"memory must be >= 0, not {self.memory}")
        folder = Path(self.reflector)
        named = str(self.reflector) in ("shipped", "self", "none")
        if not named and not any(
            (folder / name).is_file() for name in ("adapter_config.json", "config.json")
        ):
            raise ValueError(
                f"reflector must be shipped, self, none or an adapter or model folder, not {self.reflector!r}"
            )


def refuse_unsupported(supervisor: Supervisor, self_correct: SelfCorrection | None) -> None:
    """ValueError for a combination the loop cannot run."""
    if self_correct is not None and getattr(supervisor, "acts_through_tools", False):
        raise ValueError(
            "self-correction rolls back lr changes the loop makes; a tool-using supervisor acts by itself "
            "(use it without --self-correct)"
        )


@dataclass
class SupervisionContext:
    """What the loop runs with, given at invoke time (LangGraph's run context):
    `supervision_graph().invoke(state, config, context=SupervisionContext(tools, supervisor))`. The nodes
    below read it from `runtime.context`.

    tools: act on the run, and record every decision and its outcome in the run's store, through its server.
    supervisor: who decides; under self-correction wrapped by `reflecting` (the reflector, if one is set).
    pause_while_deciding: hold training from the observation to the action, so a decision acts on
        the state it saw (reproducible comparisons; by default training goes on while the supervisor
        thinks).
    self_correct: check each lr change at the next evaluation, and reflect, roll back and retry a
        failed one.
    stop_event: ends the loop from outside.
    poll_s: how often `wait` looks when it counts steps (`every_steps`); wait_timeout_s: the longest wait.
    on_decision: called with each new decision ({step, action, lr_before, lr_after, explanation, ...}),
        e.g. to print it.
    instance: names this supervisor's commands when the graph runs without a checkpointer's thread id."""

    tools: BridgeTools
    supervisor: Supervisor
    pause_while_deciding: bool = False
    self_correct: SelfCorrection | None = None
    stop_event: threading.Event | None = None
    poll_s: float = 0.2
    wait_timeout_s: float = 600.0
    on_decision: Callable[[dict], None] | None = None
    instance: str = field(default_factory=lambda: uuid4().hex[:12])

    def __post_init__(self):
        refuse_unsupported(self.supervisor, self.self_correct)
        if self.self_correct is not None:
            self.supervisor = reflecting(self.supervisor, self.self_correct.reflector)
        if getattr(self.supervisor, "acts_through_tools", False):
            self.supervisor.bind_bridge(self.tools)

    def key(self, run_id: str, config: RunnableConfig, what: str, iteration: int) -> str:
        """The idempotency key of a command or decision: the same after a resume (see the module's docstring)."""
        thread_id = (config.get("configurable") or {}).get("thread_id") or self.instance
        return f"{run_id}/{thread_id}/{iteration}/{what}"


# A model's failed answer is asked for twice more, 0.2 s then 0.4 s later (jittered); then `decide` falls back.
DECIDE_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.2, max_interval=2.0, retry_on=ModelAnswerError)


# -----------------------------------------------------------------------------------------------------
# the nodes: each reads the state and the run's context, and returns the state's update


def observe(state: SupervisionState, config: RunnableConfig, runtime: Runtime[SupervisionContext]) -> dict:
    context = runtime.context
    tools = context.tools
    run_state = tools.read_state()
    iteration = state.get("iteration", 0)
    # At the last step there is nothing left to steer (the final evaluation comes after it).
    ended = trained_out(run_state)
    deciding = not ended and iteration < state.get("max_iterations", 100)
    observations = state.get("observations", 0) + 1
    if context.pause_while_deciding and deciding:
        # Held from here to the action (or to a check that has no verdict yet), so the decision is
        # about the state it acts on.
        pause_key = context.key(run_state.get("run_id", ""), config, "pause", observations)
        if not sent_unless_over(lambda: tools.pause(pause_key)):
            return {"finished": True, "observations": observations}
        run_state = tools.read_state()
    # Only the history of the weights now training: not a branch the run forked away from.
    rows = tools.read_lineage(run_state.get("branch") or "main")
    step = int(run_state.get("step") or 0)
    lr = current_lr(run_state, rows)
    sent = state.get("sent_lr")
    if sent and tools.client.command(sent["uuid"])["status"] in ("pending", "running"):
        lr = sent["lr"]  # sent, not yet applied: the run will have it at its next step
    observation = Observation.from_metrics(rows, step=step, lr=lr, max_steps=run_state.get("max_steps"))
    observation.start_kept = bool(run_state.get("start_kept"))
    if state.get("decision_id") is not None:
        tools.client.update_decision(
            state["decision_id"], DecisionUpdate(outcome=_outcome(state, observation))
        )
    return {
        "run_id": run_state.get("run_id", ""),
        "max_steps": int(run_state.get("max_steps") or 0),
        "step": step,
        "lr": lr,
        "observation": observation.to_dict(),
        "observed_eval_step": observation.eval_loss[-1][0] if observation.eval_loss else 0,
        "finished": run_state.get("phase") in FINISHED_PHASES or ended,
        "observations": observations,
    }


def decide(state: SupervisionState, config: RunnableConfig, runtime: Runtime[SupervisionContext]) -> dict:
    """The supervisor's decision, journaled. A model's failed answer (`ModelAnswerError`) is asked again by
    the node's `DECIDE_RETRY`; any other failure, or the last try's, is journaled as the supervisor's
    `fallback` ("keep" by default), so the run (held or not) goes on with its settings, the record says
    why, and the next evaluation asks again."""
    context = runtime.context
    tools, supervisor = context.tools, context.supervisor
    iteration = state.get("iteration", 0) + 1
    decision_key = context.key(state.get("run_id", ""), config, "decision", iteration)
    recorded = tools.client.decisions(key=decision_key) if state.get("run_id") else []
    if recorded:  # decided before this process died: the same decision, not a new one
        decision = recorded[0].model_dump(include={"action", "explanation", "lr_before", "lr_after", "step"})
        return {"decision": decision, "decision_id": recorded[0].id, "iteration": iteration}
    observation = Observation(**state["observation"])
    avoid = state.get("avoid") or []
    if context.self_correct is not None:
        observation.reflections = _lessons(state, context)
        observation.avoid = list(avoid)
    try:
        wanted = supervisor.evidence(observation) if hasattr(supervisor, "evidence") else None
        if wanted:  # measured from the state decided on (held) or the next boundary (not held)
            probe_key = context.key(state["run_id"], config, "probe", iteration)
            observation.probe = tools.probe(**wanted, idempotency_key=probe_key)
        decision = supervisor.decide(observation)
    except GraphBubbleUp:  # an interrupt (a person's turn): LangGraph's control flow, not a failure
        raise
    except Exception as error:  # noqa: BLE001 - any failure of a plug-in: the run must go on
        tries = runtime.execution_info.node_attempt if runtime.execution_info else DECIDE_RETRY.max_attempts
        if isinstance(error, ModelAnswerError) and tries < DECIDE_RETRY.max_attempts:
            raise  # asked again by DECIDE_RETRY (a probe is not run again: its key returns its result)
        decision = fall_back(supervisor, observation, error)
    if decision.action in avoid:  # rules and custom supervisors may not know they cannot
        decision = Decision(
            "keep",
            f"{decision.action} was rolled back from this state, so keep (it said: {decision.explanation})",
            decision.raw_output,
            decision.fallback,
            decision.latency_s,
        )
    # Within what the run accepts: a supervisor that doubles at the bound stays at the bound. Never against
    # the decision: a run started outside the bounds (plain SGD at 9.6) stays where it is on a keep, and
    # is not pulled down by a double.
    lr_after = min(max(decision.apply(state["lr"]), LR_BOUNDS[0]), LR_BOUNDS[1])
    way = {"keep": 0, "double": 1, "halve": -1}[decision.action]
    if (lr_after - state["lr"]) * way <= 0:
        lr_after = state["lr"]
    seen = observation.to_dict()
    decision_id = None
    if state.get("run_id"):
        decision_id = tools.client.record_decision(NewDecision(
            step=state["step"], agent=supervisor.name, action=decision.action,
            explanation=decision.explanation, strategy=supervisor.strategy, model=supervisor.model,
            observation=finite_or_null(observation.record()), raw_output=decision.raw_output,
            lr_before=state["lr"], lr_after=lr_after, latency_s=decision.latency_s, fallback=decision.fallback,
            key=decision_key, retry_of=state.get("retry_of"),
        )).id  # the decision row, as stored # fmt: skip
    made = {**decision.__dict__, "lr_before": state["lr"], "lr_after": lr_after, "step": state["step"]}
    if context.on_decision is not None:
        context.on_decision(made)
    return {
        "decision": made,
        "decision_id": decision_id,
        "iteration": iteration,
        "observation": seen,
        "avoid": [],
        "retry_of": None,
    }


def act(state: SupervisionState, config: RunnableConfig, runtime: Runtime[SupervisionContext]) -> dict:
    if state.get("finished"):
        return {}
    context = runtime.context
    tools = context.tools
    decision, iteration = state["decision"], state["iteration"]
    update: dict = {}
    try:
        # A decision that changes nothing (a double at the lr's upper bound) is acted on as keep.
        changes = decision["action"] != "keep" and decision["lr_after"] != decision["lr_before"]
        if changes and not decision.get("acted"):
            if context.self_correct is not None:
                # The rollback point: journaled before the lr change, so saved before it applies. Named
                # by run too: another run in the same output folder must not find it taken.
                name = f"rollback-{iteration}-{state['run_id'][:8]}"
                point = tools.client.save_checkpoint(
                    name, idempotency_key=context.key(state["run_id"], config, "rollback", iteration)
                )
                update["pending_check"] = {
                    **{k: decision[k] for k in ("action", "lr_before", "lr_after", "step")},
                    "decision_id": state.get("decision_id"),
                    "iteration": iteration,
                    "observation": state["observation"],
                    "checkpoint": name,
                    "checkpoint_uuid": point["uuid"],
                    "avoided": state["observation"].get("avoid") or [],
                }
            lr_key = context.key(state["run_id"], config, "lr", iteration)
            if decision.get("restart"):  # the arm's state, with its lr: loaded into a new branch
                row = tools.client.load_checkpoint(
                    decision["restart"], f"restart-{iteration}", idempotency_key=lr_key
                )
            else:
                row = tools.set_lr(decision["lr_after"], idempotency_key=lr_key)
            update["sent_lr"] = {"uuid": row["uuid"], "lr": decision["lr_after"]}
            if "pending_check" in update:
                update["pending_check"]["command_uuid"] = row["uuid"]
            if state.get("decision_id") is not None:  # its applied_step: the step this command takes effect
                tools.client.update_decision(state["decision_id"], DecisionUpdate(command=row["uuid"]))
        elif context.self_correct is not None:
            update["pending_check"] = None
    except BridgeHTTPError as error:
        if error.status_code != 409:
            raise
        update["finished"] = True  # the run ended while we were deciding
    finally:
        # Whatever happened, a run paused for this decision goes on: it is never left waiting.
        if not _release(state, config, context):
            update["finished"] = True
    return update


def check(state: SupervisionState, config: RunnableConfig, runtime: Runtime[SupervisionContext]) -> dict:
    """Judge the last lr change; on a failure reflect, then roll back (or set the lr back)."""
    context = runtime.context
    tools, self_correct = context.tools, context.self_correct
    pending = state["pending_check"]
    decided, now = Observation(**pending["observation"]), Observation(**state["observation"])
    verdict = _verdict(pending, decided, now, tools, self_correct.margin)
    if verdict is _NEVER_APPLIED:  # the command failed: nothing to judge
        return {"pending_check": None, "rolled_back": False, "awaiting_verdict": False}
    if verdict is None:  # not applied yet, or no evaluation since: judged at a later observation
        if not _release(state, config, context):
            return {"finished": True, "rolled_back": False, "awaiting_verdict": True}
        return {"rolled_back": False, "awaiting_verdict": True}
    if not verdict.failed:
        if pending["decision_id"] is not None:  # the verdict is part of what followed it
            outcome = {**_outcome({"observation": pending["observation"], "step": pending["step"]}, now)}
            outcome["verdict"] = asdict(verdict)
            tools.client.update_decision(
                pending["decision_id"], DecisionUpdate(outcome=finite_or_null(outcome))
            )
        return {"pending_check": None, "rolled_back": False, "awaiting_verdict": False}
    action = pending["action"]
    facts = factual_reflection(action, pending["lr_before"], pending["lr_after"], pending["step"], verdict)
    try:
        reflection = context.supervisor.reflect(decided, action, facts)
    except Exception:  # noqa: BLE001 - a plug-in's failure: the facts are a reflection too
        reflection = facts
    update: dict = {
        "pending_check": None,
        "decision_id": None,  # its outcome is written here, once
        "reflections": [*(state.get("reflections") or []), reflection],
        "avoid": [*pending["avoided"], action],
        "retry_of": pending["decision_id"],
        "rolled_back": False,
        "awaiting_verdict": False,
    }
    outcome = {
        **_outcome({"observation": pending["observation"], "step": pending["step"]}, now),
        "verdict": asdict(verdict),  # stored through finite_or_null, like the rest of the outcome
        "reflection_source": "facts" if reflection == facts else "model",
    }
    undone, outcome_more = _undo(state, config, context)
    update |= undone
    outcome |= outcome_more
    if pending["decision_id"] is not None:
        update_row = DecisionUpdate(
            reflection=reflection, outcome=finite_or_null(outcome), rolled_back="rolled_back_to" in outcome
        )
        tools.client.update_decision(pending["decision_id"], update_row)
    return update


def wait(state: SupervisionState, runtime: Runtime[SupervisionContext]) -> dict:
    """Until a newer evaluation, `every_steps` more steps, or the end of the run."""
    context = runtime.context
    tools = context.tools
    deadline = time.monotonic() + context.wait_timeout_s
    # A change awaiting its verdict needs an evaluation: more steps alone would only check again.
    every = 0 if state.get("awaiting_verdict") else state.get("every_steps", 0)
    while time.monotonic() < deadline:
        if context.stop_event is not None and context.stop_event.is_set():
            return {"finished": True}
        token = tools.client.watch()  # before looking: a change after it ends the wait below at once
        run_state = tools.read_state()
        if run_state.get("phase") in FINISHED_PHASES:
            return {"finished": True}
        if every and int(run_state.get("step") or 0) >= state.get("step", 0) + every:
            return {}
        # An evaluation newer than the last one seen, of the weights now training: after a rollback the
        # branch left behind holds evaluations past the rollback point that are no news. Not "newer than
        # the step it was seen at": the observation at step E can come before E's evaluation is logged,
        # and a run held after that evaluation for a decision then waited for this wait, this wait for
        # the next evaluation, until the hold timed out (300 s).
        branch = run_state.get("branch") or "main"
        if tools.read_metrics(since=state.get("observed_eval_step", 0), names=["eval_loss"], branch=branch):
            return {}
        # Steps are no change notice: counting them needs a look every poll_s. Otherwise the next
        # evaluation, command or end wakes an in-process wait; over HTTP this is a poll_s pause.
        limit = context.poll_s if every else min(1.0, deadline - time.monotonic())
        tools.client.wait_for_change(token, max(0.0, limit), context.poll_s)
    return {}


# the edges


def after_observe(state: SupervisionState) -> str:
    if state.get("finished") or state.get("iteration", 0) >= state.get("max_iterations", 100):
        return END
    return "check" if state.get("pending_check") else "decide"  # only self-correction leaves one


def after_check(state: SupervisionState) -> str:
    if state.get("finished"):
        return END
    # No verdict yet: no new decision over an unjudged one; wait for the evaluation that judges it.
    if state.get("awaiting_verdict"):
        return "wait"
    # Rolled back: the run is at the rollback point now, so look again before deciding again.
    return "observe" if state.get("rolled_back") else "decide"


def after_wait(state: SupervisionState) -> str:
    return END if state.get("finished") else "observe"


def supervision_graph(checkpointer=None):
    """The loop, compiled: invoke it with `context=SupervisionContext(tools, supervisor, ...)`.
    `checkpointer` (e.g. `SqliteSaver`) makes it resumable."""
    graph = StateGraph(SupervisionState, context_schema=SupervisionContext)
    for node in (observe, check, act, wait):
        graph.add_node(node.__name__, node)
    graph.add_node(decide, retry_policy=DECIDE_RETRY)
    graph.add_edge(START, "wait")  # the first decision waits for the first evaluation: nothing to see before
    graph.add_conditional_edges("observe", after_observe, ["check", "decide", END])
    graph.add_conditional_edges("check", after_check, ["observe", "decide", "wait", END])
    graph.add_edge("decide", "act")
    graph.add_edge("act", "wait")
    graph.add_conditional_edges("wait", after_wait, ["observe", END])
    return graph.compile(checkpointer=checkpointer)


# the nodes' helpers


def _release(state: SupervisionState, config: RunnableConfig, context: SupervisionContext) -> bool:
    """Resumes a run held since this observation; False when the run has ended meanwhile."""
    if not context.pause_while_deciding:
        return True
    resume_key = context.key(state["run_id"], config, "resume", state.get("observations", 0))
    return sent_unless_over(lambda: context.tools.resume(resume_key))


def _lessons(state: SupervisionState, context: SupervisionContext) -> list[str]:
    """The reflections a decision sees: this run's latest, and earlier runs' when remembered."""
    memory = context.self_correct.memory
    texts = (state.get("reflections") or [])[-memory:] if memory else []
    if context.self_correct.remember_runs and len(texts) < memory:
        earlier = context.tools.client.reflections(agent=context.supervisor.name, limit=4 * memory)
        others = [r.reflection for r in earlier if r.run_id != state.get("run_id")]  # newest first
        texts = others[: memory - len(texts)][::-1] + texts
    return texts


_NEVER_APPLIED = object()


def _verdict(pending: dict, decided: Observation, now: Observation, tools: BridgeTools, margin: float):
    """The verdict on a pending lr change, judged only by an evaluation after it took effect (a
    supervisor that does not hold the run acts tens of steps after it observed, and evaluations in
    between saw the old lr); None while there is none; `_NEVER_APPLIED` when its command failed."""
    command = tools.client.command(pending["command_uuid"]) if pending.get("command_uuid") else None
    if command is not None and command["status"] == "failed":
        return _NEVER_APPLIED
    applied_step = command["step"] if command is not None and command["status"] == "success" else None
    if applied_step is None and command is not None:
        return None
    took_effect = pending["step"] if applied_step is None else applied_step
    # The loss it is held to: the latest evaluation before it took effect (the decision saw the one at
    # its own step; the run may have moved on since).
    before = [v for s, v in now.eval_loss if pending["step"] <= s <= took_effect]
    loss_before = before[-1] if before else (decided.losses[-1][1] if decided.losses else math.nan)
    return judge(loss_before, took_effect, now, margin)


def _undo(state: SupervisionState, config: RunnableConfig, context: SupervisionContext) -> tuple[dict, dict]:
    """Undo a failed lr change: roll back to the checkpoint saved before it, or (over the budget of
    extra steps, or with no rollback point) set the lr back. Returns (state update, outcome fields)."""
    tools, pending = context.tools, state["pending_check"]
    iteration = pending["iteration"]
    point = tools.client.command(pending["checkpoint_uuid"])
    # The steps a rollback abandons: everything trained since the rollback point was saved.
    spent = state["step"] - (point["step"] if point.get("step") is not None else pending["step"])
    budget = context.self_correct.max_extra_steps * (state.get("max_steps") or 0)
    why = "no rollback point" if point["status"] != "success" else "over the budget of extra steps"
    loaded = None
    # Judged after its last step, a run has nothing left to retry on (and applies no more commands).
    ended = trained_out(tools.read_state())
    if not ended and point["status"] == "success" and state.get("extra_steps", 0) + spent <= budget:
        branch = f"retry-{iteration}"
        # Under a key: a supervisor that dies in this node and comes back rolls back once, not twice.
        rollback_key = context.key(state["run_id"], config, "load-rollback", iteration)
        sent = tools.client.load_checkpoint(pending["checkpoint"], branch, idempotency_key=rollback_key)
        try:
            loaded = tools.client.wait(sent["uuid"], timeout=tools.wait_s)  # until the run has it
            why = f"the rollback failed: {loaded.get('error')}"
        except CommandTimeout:
            if not trained_out(tools.read_state()):
                raise
            ended = True  # it trained its last step meanwhile: the command is never applied
    if ended:
        return {"finished": True}, {"why_not_rolled_back": "the run ended first"}
    if loaded is not None and loaded["status"] == "success":
        update = {
            "rollbacks": state.get("rollbacks", 0) + 1,
            "extra_steps": state.get("extra_steps", 0) + spent,
            "sent_lr": None,  # the checkpoint brought its own lr back
            "rolled_back": True,
        }
        return update, {"rolled_back_to": pending["checkpoint"], "branch": branch, "extra_steps": spent}
    # Over the budget (or no rollback point): keep the weights, give the lr back, within the bounds the
    # command keeps to (a run started above them goes back to the bound, not to its start).
    revert_key = context.key(state["run_id"], config, "revert", iteration)
    back = min(max(pending["lr_before"], LR_BOUNDS[0]), LR_BOUNDS[1])
    try:
        row = tools.set_lr(back, idempotency_key=revert_key)
    except BridgeHTTPError as error:
        if error.status_code != 409:
            raise
        return {"finished": True}, {"why_not_rolled_back": f"{why}; the run ended first"}
    update = {
        "reverts": state.get("reverts", 0) + 1,
        "lr": back,
        "observation": {**state["observation"], "lr": back},
        "sent_lr": {"uuid": row["uuid"], "lr": back},
    }
    return update, {"reverted": True, "why_not_rolled_back": why}


def run_supervision(
    run: str | RunControl,
    supervisor: Supervisor,
    *,
    db: str | None = None,
    token: str | None = None,
    max_iterations: int = 100,
    every_steps: int = 0,
    stop_event: threading.Event | None = None,
    thread_id: str | None = None,
    ask_human=None,
    pause_while_deciding: bool = False,
    self_correct: SelfCorrection | None = None,
    on_decision: Callable[[dict], None] | None = None,
) -> dict:
    """Supervise a run until it ends; returns the graph's final state.

    run: the URL of a run served elsewhere (steered over HTTP), or a `RunControl`: a run in this
        process is steered through `LocalRunControl(bridge)`, with no request and no polling.

    db: where the graph's checkpoints go (default ./selfsteer.sqlite), so that the same `thread_id`
        (default: supervise:RUN_ID) resumes an interrupted supervisor. Decisions go to the run's own
        store through its server: nothing but the URL is needed to record them.
    ask_human: called with the question of a `HumanSupervisor` interrupt, returns the answer
        (default: asks on the terminal).
    """
    db = db or DEFAULT_DB_PATH
    if isinstance(run, str):
        control = BridgeClient(run, token=token, source=supervisor.name[:40])
    else:
        control, run.source = run, supervisor.name[:40]
    with control as client:
        tools = BridgeTools(client)
        thread_id = thread_id or f"supervise:{tools.read_state().get('run_id', getattr(client, 'url', ''))}"
        with SqliteSaver.from_conn_string(db) as checkpointer:
            graph = supervision_graph(checkpointer)
            context = SupervisionContext(
                tools,
                supervisor,
                pause_while_deciding=pause_while_deciding,
                self_correct=self_correct,
                stop_event=stop_event,
                on_decision=on_decision,
            )
            # Each decision takes at most six steps of the graph (wait, observe, check, observe after a
            # rollback, decide, act), plus three (wait, observe, check) for each evaluation that comes
            # before its change took effect: allow for a few of those. The cap is max_iterations.
            config = {"configurable": {"thread_id": thread_id}, "recursion_limit": 15 * max_iterations + 30}
            resuming = graph.get_state(config).next
            start = None if resuming else {"max_iterations": max_iterations, "every_steps": every_steps}
            try:
                result = graph.invoke(start, config, context=context)
                while result.get("__interrupt__"):  # a person's turn (HumanSupervisor)
                    answer = (ask_human or ask_on_terminal)(result["__interrupt__"][0].value)
                    result = graph.invoke(Command(resume=answer), config, context=context)
            except httpx.TransportError:
                if (stop_event is None or not stop_event.is_set()) and tools.still_served():
                    raise  # the server answers: a real fault, not the end of the run
                # The run ended and took its server with it (a loop closes its server as it ends).
                result = {"finished": True}
            except Exception as error:
                give_the_run_back(tools, supervisor, error, held=pause_while_deciding)
                raise
            return result


def give_the_run_back(tools: BridgeTools, supervisor: Supervisor, error: Exception, held: bool) -> None:
    """A supervisor that crashed leaves the run as it found it, running: a run it held is resumed, and
    the crash is journaled as a fallback decision to keep, so the record says why nothing more came.
    Best effort: the run may be gone too."""
    try:
        if held:
            tools.resume()
        state = tools.read_state()
        if state.get("run_id") and state.get("phase") not in FINISHED_PHASES:
            explanation = (
                f"the supervisor crashed ({type(error).__name__}: {error}); the run goes on with its settings"
            )
            lr = current_lr(state, [])
            tools.client.record_decision(NewDecision(
                step=int(state.get("step") or 0), agent=supervisor.name, action="keep",
                explanation=explanation[:4000], strategy=supervisor.strategy, model=supervisor.model,
                lr_before=lr or None, lr_after=lr or None, fallback=True,
            ))  # the fallback decision row, as stored # fmt: skip
    except (httpx.HTTPError, BridgeHTTPError, TimeoutError) as failure:
        print(
            f"[selfsteer] could not give the run back after the supervisor crashed: {failure}",
            file=sys.stderr,
        )


def ask_on_terminal(question: dict) -> dict:
    print(f"\nstep {question.get('step')}, learning rate {question.get('lr'):g}. {question.get('stats', '')}")
    while True:
        answer = input("double, halve or keep? [keep] ").strip().lower() or "keep"
        if answer in ACTIONS:
            return {"action": answer, "explanation": input("why (optional)? ").strip() or "human decision"}
        print("please answer double, halve or keep")


def _outcome(state: SupervisionState, now: Observation) -> dict:
    """How the eval loss moved between the decision and the next observation."""
    before = Observation(**state["observation"]).losses
    after = now.losses
    outcome: dict[str, Any] = {"steps": now.step - state["step"]}
    if before and after:
        outcome["loss_before"], outcome["loss_after"] = before[-1][1], after[-1][1]
        if math.isfinite(before[-1][1]) and math.isfinite(after[-1][1]):
            outcome["loss_change"] = after[-1][1] - before[-1][1]
    return finite_or_null(outcome)
