"""The self-correction graph's paths, driven by a *scripted* chat model (the one stand-in in these
tests: a LangChain chat model whose answer is a function of the conversation, so each path is
reached on purpose; tests/helpers/scripted_chat.py). Validators, the store and LangGraph are real.
Problems with tools (BFCL in tools mode) run the same loop with the tools bound to the attempts."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable

import pytest
from helpers.scripted_chat import ScriptedChatModel, tool_calls
from langchain_core.language_models import FakeListChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langgraph.runtime import Runtime

from selfsteer.evals.tasks import bfcl, countdown
from selfsteer.graphs.reflect import (
    Attempt,
    ReflectConfig,
    ReflectContext,
    Reflection,
    ReflectionMemory,
    first_messages,
    load_prompts,
    mine_failures,
    reflection_reward,
    render_tool_calls,
    reward,
    run_episodes,
    validate,
)
from selfsteer.trainer_bridge.records import EpisodeReflection
from selfsteer.trainer_bridge.store import Store

REFLECT = load_prompts()["reflect"]
LESSON = "I must use every number exactly once and multiply the sum."


def solver(fix_after_reflection: bool = True) -> Callable[[list[BaseMessage]], str]:
    """Wrong at first; reflects; right on the retry when a reflection is in context (if asked to be)."""

    def script(messages: list[BaseMessage]) -> str:
        last = messages[-1].content
        if last == REFLECT:
            return LESSON
        seen_lesson = any(LESSON in m.content for m in messages)
        return "(3 + 5) * 2" if fix_after_reflection and seen_lesson else "3 + 5 + 2"

    return script


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "s.sqlite") as store:
        yield store


PROBLEM = countdown.make_problem([3, 5, 2], 16)


def test_pass_on_first_try_ends_without_reflection(store):
    llm = ScriptedChatModel(script=lambda messages: "(3 + 5) * 2", calls=[])
    [result] = run_episodes(llm, [PROBLEM], ReflectConfig(), store)
    assert result.passed_first and result.passed_final and not result.reflections
    episode = store.get_episode(result.episode_id)
    assert episode["status"] == "finished" and episode["passed_first"] and episode["passed_final"]
    assert len(episode["attempts"]) == 1 and episode["attempts"][0]["reason"] == "correct"
    assert episode["task"] == "countdown" and episode["task_id"] == PROBLEM.id


def test_fail_reflect_retry_pass_rewards_the_reflection_and_stores_everything(store):
    llm = ScriptedChatModel(script=solver(), calls=[])
    [result] = run_episodes(
        llm, [PROBLEM], ReflectConfig("reflect_attempt"), store, model_name="scripted", seed=7
    )
    assert not result.passed_first and result.passed_final
    assert [r["text"] for r in result.reflections] == [LESSON] and result.rewards == [1.0]
    retry_prompt = result.attempts[1]["prompt"]
    assert any(m["content"] == "3 + 5 + 2" for m in retry_prompt)  # the failed attempt ...
    assert any(m["content"] == LESSON for m in retry_prompt)  # ... and the reflection are in context

    episode = store.get_episode(result.episode_id)
    assert (episode["strategy"], episode["model"], episode["seed"]) == ("reflect_attempt", "scripted", 7)
    assert not episode["passed_first"] and episode["passed_final"]
    assert [(a["attempt_index"], a["passed"]) for a in episode["attempts"]] == [(0, False), (1, True)]
    assert "not 16" in episode["attempts"][0]["reason"]
    assert "3 + 5 + 2" in episode["attempts"][1]["prompt"] and LESSON in episode["attempts"][1]["prompt"]
    [reflection] = episode["reflections"]
    assert (reflection["text"], reflection["after_attempt"], reflection["reward"]) == (LESSON, 0, 1.0)
    assert reflection["n_tokens"] > 0


def test_strategy_reflect_retries_with_the_reflection_but_not_the_failed_attempt():
    llm = ScriptedChatModel(script=solver(), calls=[])
    [result] = run_episodes(llm, [PROBLEM], ReflectConfig("reflect"))
    retry_prompt = result.attempts[1]["prompt"]
    assert not any(m["role"] == "assistant" for m in retry_prompt)
    assert LESSON in retry_prompt[-1]["content"] and PROBLEM.prompt in retry_prompt[-1]["content"]
    assert result.passed_final and result.rewards == [1.0]


def test_strategy_retry_tries_again_without_reflecting(store):
    llm = ScriptedChatModel(script=solver(), calls=[])
    [result] = run_episodes(llm, [PROBLEM], ReflectConfig("retry", max_retries=2), store)
    assert len(result.attempts) == 3 and not result.reflections and not result.passed_final
    assert all(m.content != REFLECT for call in llm.calls for m in call)
    assert result.attempts[1]["prompt"][-1]["content"] == load_prompts()["plain_retry"]
    assert store.get_episode(result.episode_id)["reflections"] == []


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_the_retry_cap_is_explicit(store, max_retries):
    llm = ScriptedChatModel(script=solver(fix_after_reflection=False), calls=[])
    [result] = run_episodes(llm, [PROBLEM], ReflectConfig(max_retries=max_retries), store)
    assert len(result.attempts) == max_retries + 1 and not result.passed_final
    assert len(result.reflections) == max_retries and result.rewards == [0.0] * max_retries
    episode = store.get_episode(result.episode_id)
    assert len(episode["attempts"]) == max_retries + 1
    assert [r["reward"] for r in episode["reflections"]] == [0.0] * max_retries


def test_memory_carries_rewarded_reflections_to_later_episodes():
    memory = ReflectionMemory(size=3)
    llm = ScriptedChatModel(script=solver(), calls=[])
    first, second = countdown.make_problem([3, 5, 2], 16), countdown.make_problem([4, 6, 1], 25)
    run_episodes(llm, [first], ReflectConfig("memory"), memory=memory)
    assert memory.lessons() == [LESSON]
    [result] = run_episodes(llm, [second], ReflectConfig("memory"), memory=memory)
    assert LESSON in result.attempts[0]["prompt"][0]["content"]  # in the first attempt's system prompt


def test_many_episodes_run_concurrently_and_come_back_in_order(store):
    active, peak, lock = [0], [0], threading.Lock()

    def script(messages):
        import time

        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return solver()(messages)

    problems = countdown.load("test", n=8, seed=1)
    llm = ScriptedChatModel(script=script, calls=[])
    results = run_episodes(llm, problems, ReflectConfig(), store, concurrency=8)
    assert [r.problem_id for r in results] == [p.id for p in problems]
    assert peak[0] > 1  # calls overlapped: the embedded model would batch them
    assert len(store.list_episodes(task="countdown")) == 8
    assert all(e["status"] == "finished" for e in store.list_episodes())


def test_mine_failures_keeps_failed_first_attempts_in_one_batch():
    problems = [countdown.make_problem([3, 5, 2], 16), countdown.make_problem([2, 5, 3], 10)]
    llm = ScriptedChatModel(script=lambda messages: "3 + 5 + 2", calls=[], batches=[])
    rows = mine_failures(llm, problems)
    assert llm.batches == [2]
    assert [row["problem_id"] for row in rows] == [problems[0].id]  # 3 + 5 + 2 = 10 passes the second
    assert rows[0]["failed_attempt"] == "3 + 5 + 2"
    assert rows[0]["prompt"][-1]["content"] == REFLECT and rows[0]["prompt"][-2]["content"] == "3 + 5 + 2"


def test_reflection_reward_runs_the_retry_with_each_reflection():
    reward = reflection_reward([PROBLEM])
    conversations = []

    def generate(batch):
        conversations.extend(batch)
        return ["(3 + 5) * 2" if any("multiply" in m["content"] for m in c) else "3 * 5 * 2" for c in batch]

    rows = {"problem_id": [PROBLEM.id, PROBLEM.id], "failed_attempt": ["3 + 5 + 2", "3 + 5 + 2"]}
    assert reward([LESSON, "No idea."], rows, generate) == [1.0, 0.0]
    assert conversations[0][-2]["content"] == LESSON and conversations[0][-1]["role"] == "user"


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="strategy"):
        ReflectConfig("shout")
    with pytest.raises(ValueError, match="max_retries"):
        ReflectConfig(max_retries=-1)


def test_an_episode_that_breaks_is_stored_as_failed(store):
    def script(messages):
        if messages[-1].content == REFLECT:
            raise TimeoutError("model went away")
        return "3 + 5 + 2"

    with pytest.raises(TimeoutError):
        run_episodes(ScriptedChatModel(script=script, calls=[]), [PROBLEM], ReflectConfig(), store)
    [episode] = store.list_episodes()
    assert episode["status"] == "failed"
    assert len(store.get_episode(episode["id"])["attempts"]) == 1

    def down(messages):  # the first attempt's model call fails: the row is open, and finished too
        raise ConnectionError("no model") if "16" in messages[-1].content else TimeoutError("slow")

    problems = [countdown.make_problem([3, 5, 2], 16), countdown.make_problem([2, 5, 3], 10)]
    with pytest.raises(ConnectionError):
        run_episodes(
            ScriptedChatModel(script=down, calls=[]), problems, ReflectConfig(), store, concurrency=1
        )
    assert [e["status"] for e in store.list_episodes()] == ["failed"] * 3  # both ran: neither is left running


# -----------------------------------------------------------------------------
# one node alone: a hand-made state and the run's context, no graph


def no_model(messages):
    raise AssertionError("this node does not call the model")


def test_validate_alone_records_the_verdict_with_its_reason_and_cost(store):
    # the countdown validator, with a cost as the decisions task's verdicts carry one (its regret)
    problem = dataclasses.replace(
        PROBLEM, validate=lambda answer: dataclasses.replace(PROBLEM.validate(answer), cost=6.0)
    )
    context = ReflectContext(ScriptedChatModel(script=no_model), store=store)
    episode_id = store.add_episode(context.new_episode(problem))
    prompt = first_messages(problem)
    pending = Attempt(prompt=prompt, response="3 + 5 + 2", passed=False, reason="")
    state = {"problem": problem, "episode_id": episode_id, "pending": pending, "attempts": []}

    update = validate(state, Runtime(context=context))
    [done] = update["attempts"]
    assert update["pending"] is None
    assert (done["prompt"], done["response"], done["passed"], done["cost"]) == (
        prompt,
        "3 + 5 + 2",
        False,
        6.0,
    )
    assert done["reason"] == PROBLEM.validate("3 + 5 + 2").reason and "not 16" in done["reason"]
    [row] = store.get_episode(episode_id)["attempts"]
    assert (row["attempt_index"], row["response"], row["passed"]) == (0, "3 + 5 + 2", False)
    assert row["reason"] == done["reason"] and PROBLEM.prompt in row["prompt"]


def test_reward_alone_gives_1_exactly_to_a_reflection_whose_next_attempt_passed(store):
    memory = ReflectionMemory(size=3)
    context = ReflectContext(
        ScriptedChatModel(script=no_model), ReflectConfig("memory", max_retries=2), store, memory
    )
    episode_id = store.add_episode(context.new_episode(PROBLEM))
    answers = ["3 + 5 + 2", "3 * 5 + 2", "(3 + 5) * 2"]  # 10, 17, 16: fail, fail, pass
    attempts = [Attempt(prompt=[], response=a, passed=PROBLEM.validate(a).passed, reason="") for a in answers]
    reflections = []
    for after, text in enumerate(["Add them all.", LESSON]):
        row = store.add_reflection(episode_id, EpisodeReflection(after_attempt=after, text=text, n_tokens=3))
        reflections.append(Reflection(text=text, n_tokens=3, after_attempt=after, id=row))
    state = {"problem": PROBLEM, "episode_id": episode_id, "attempts": attempts, "reflections": reflections}

    assert reward(state, Runtime(context=context)) == {"rewards": [0.0, 1.0]}
    assert memory.lessons() == [LESSON]  # strategy memory keeps the rewarded reflection only
    episode = store.get_episode(episode_id)
    assert [r["reward"] for r in episode["reflections"]] == [0.0, 1.0]
    assert (episode["status"], episode["passed_first"], episode["passed_final"]) == ("finished", False, True)


# -----------------------------------------------------------------------------
# problems with tools (BFCL in tools mode)


def _bfcl_tools_problem(category: str = "simple_python", index: int = 0):
    """A tools-mode BFCL problem whose function has a dotted name, and its gold call under the tool name."""
    question, truth = [(q, t) for q, t in bfcl._records(category) if "." in q["function"][0]["name"]][index]
    problem = bfcl.make_problem(question, truth, category, call_mode="tools")
    [(name, params)] = truth[0].items()
    arguments = {k: next(v for v in values if v != "") for k, values in params.items() if values != [""]}
    return problem, (bfcl.tool_name(name), arguments)


def tool_solver(gold: tuple[str, dict]) -> Callable:
    """With tools bound: a wrong call at first, the gold call once a reflection is in context. Without
    tools (the reflection): plain text."""
    name, arguments = gold

    def script(messages: list[BaseMessage], bound: dict):
        if not bound:
            return LESSON
        if any(LESSON in m.content for m in messages):
            return tool_calls((name, arguments))
        return tool_calls((name, {k: "wrong" for k in arguments}))

    return script


def test_a_tools_episode_calls_with_tools_bound_reflects_in_text_and_rewards_the_fixed_call(store):
    problem, gold = _bfcl_tools_problem()
    llm = ScriptedChatModel(script=tool_solver(gold))
    [result] = run_episodes(llm, [problem], ReflectConfig("reflect_attempt"), store)
    assert not result.passed_first and result.passed_final and result.rewards == [1.0]

    # attempt, reflection, retry: tools bound (a call required) for the attempts, none for the reflection
    attempt, reflection, retry = llm.bound
    assert attempt == retry and attempt["tool_choice"] == "required"
    assert [t["function"]["name"] for t in attempt["tools"]] == [t["function"]["name"] for t in problem.tools]
    assert gold[0] in [t["function"]["name"] for t in attempt["tools"]] and "." not in gold[0]
    assert reflection == {}
    assert llm.calls[1][-1].content == REFLECT

    # the answers are the JSON rendering of the tool calls; the retry sees the failed one as text
    failed = json.loads(result.attempts[0]["response"])
    assert failed == [{"name": gold[0], "arguments": {k: "wrong" for k in gold[1]}}]
    assert json.loads(result.attempts[1]["response"]) == [{"name": gold[0], "arguments": gold[1]}]
    assert "no function call" not in result.attempts[0]["reason"]
    retry_prompt = result.attempts[1]["prompt"]
    assert {"role": "assistant", "content": result.attempts[0]["response"]} in retry_prompt
    assert {"role": "assistant", "content": LESSON} in retry_prompt
    assert (
        retry_prompt[1] == {"role": "user", "content": problem.prompt} and "Functions:" not in problem.prompt
    )

    episode = store.get_episode(result.episode_id)
    assert [a["passed"] for a in episode["attempts"]] == [False, True]
    assert episode["attempts"][0]["prompt"].startswith("[tools, tool_choice=required]\n" + gold[0])
    assert episode["reflections"][0]["reward"] == 1.0


def test_a_tools_answer_without_a_call_fails_as_no_function_call():
    problem, _ = _bfcl_tools_problem()
    llm = ScriptedChatModel(script=lambda messages: "I cannot help with that.")
    [result] = run_episodes(llm, [problem], ReflectConfig(max_retries=0))
    assert result.attempts[0]["response"] == "I cannot help with that."
    assert result.attempts[0]["reason"].startswith("no function call")


def test_render_tool_calls():
    assert render_tool_calls(AIMessage(content="plain text")) == "plain text"
    rendered = render_tool_calls(tool_calls(("f", {"a": 1, "b": "é"}), ("g", {})))
    assert rendered == '[{"name": "f", "arguments": {"a": 1, "b": "é"}}, {"name": "g", "arguments": {}}]'
    broken = AIMessage(
        content="",
        invalid_tool_calls=[
            {"name": "f", "args": "{'a': 1", "id": "1", "error": None, "type": "invalid_tool_call"}
        ],
    )
    assert json.loads(render_tool_calls(broken)) == [{"name": "f", "arguments": "{'a': 1"}]


def test_mine_failures_with_tools_binds_each_problem_and_calls_concurrently():
    (first, gold), (second, _) = _bfcl_tools_problem(index=0), _bfcl_tools_problem(index=1)
    assert first.tools != second.tools
    llm = ScriptedChatModel(script=lambda messages, bound: tool_calls(gold))  # right for the first only
    rows = mine_failures(llm, [first, second, countdown.make_problem([3, 5, 2], 16)])
    assert llm.batches == []  # different tools: no shared batch
    by_prompt = {c[-1].content: b for c, b in zip(llm.calls, llm.bound, strict=True)}
    assert by_prompt[first.prompt]["tools"] == list(first.tools)
    assert by_prompt[second.prompt]["tools"] == list(second.tools)
    assert by_prompt[countdown.make_problem([3, 5, 2], 16).prompt] == {}  # a text problem: no tools
    assert [row["problem_id"] for row in rows][:1] == [second.id] and len(rows) == 2
    assert json.loads(rows[0]["failed_attempt"]) == [{"name": gold[0], "arguments": gold[1]}]
    assert rows[0]["prompt"][-1]["content"] == REFLECT


def test_a_reflector_beside_the_model_writes_the_reflections_and_only_them(store):
    """`reflector=`: the reflection is the reflector's (no tools bound); the attempt and the retry stay the
    model's (the frozen actor), and what the reflector wrote reaches the retry."""
    problem, gold = _bfcl_tools_problem()
    actor = ScriptedChatModel(script=tool_solver(gold))
    reflector = ScriptedChatModel(script=lambda messages: LESSON)
    [result] = run_episodes(actor, [problem], ReflectConfig("reflect_attempt"), store, reflector=reflector)
    assert result.reflections[0]["text"] == LESSON and result.passed_final and not result.passed_first
    assert reflector.bound == [{}] and reflector.calls[0][-1].content == REFLECT
    assert [b["tool_choice"] for b in actor.bound] == ["required", "required"]  # attempt and retry only
    silent = ScriptedChatModel(script=lambda messages: "I have no idea.")
    actor = ScriptedChatModel(script=tool_solver(gold))
    [result] = run_episodes(actor, [problem], ReflectConfig("reflect_attempt"), store, reflector=silent)
    assert not result.passed_final and result.rewards == [0.0]  # the actor alone would have written LESSON


def test_tools_need_a_model_that_calls_tools_and_the_reward_an_actor():
    problem, _ = _bfcl_tools_problem()
    with pytest.raises(ValueError, match="cannot call tools.*--call-mode text"):
        run_episodes(FakeListChatModel(responses=["x"]), [problem], ReflectConfig())
    with pytest.raises(ValueError, match="1 problem.*offer tools.*needs an actor"):
        reflection_reward([PROBLEM, problem])
    with pytest.raises(ValueError, match="retry_samples must be 1 or more"):
        reflection_reward([problem], actor=ScriptedChatModel(script=lambda m: "x"), retry_samples=0)


def test_reflection_reward_with_tools_is_the_share_of_the_actors_sampled_retries_that_pass():
    """A tools problem's retry is a tool call by the actor (the frozen model), the problem's tools bound,
    sampled at the retry temperature with a seed of its own: each reflection's reward is the share of its
    retries that pass, the policy's `generate` is never called, and the next batch draws new seeds."""
    problem, gold = _bfcl_tools_problem()

    def actor_script(messages, bound):
        told = "use the documented values" in messages[-2].content  # the reflection, before "answer again"
        return tool_calls(gold if told and bound["seed"] % 2 else (gold[0], {}))  # {}: a missing parameter

    actor = ScriptedChatModel(script=actor_script)
    reward = reflection_reward([problem], actor=actor, retry_temperature=1.0, retry_samples=2, seed=10)
    rows = {"problem_id": [problem.id] * 2, "failed_attempt": ["[]"] * 2, "reason": ["wrong"] * 2}

    def never(batch):
        raise AssertionError("tool-call retries are the actor's, not the policy's")

    assert reward(["I will use the documented values.", "No idea."], rows, never) == [0.5, 0.0]
    assert all(b["tools"] == list(problem.tools) and b["temperature"] == 1.0 for b in actor.bound)
    assert sorted(b["seed"] for b in actor.bound) == [10, 11, 12, 13]
    reward(["I will use the documented values.", "No idea."], rows, never)
    assert sorted(b["seed"] for b in actor.bound[4:]) == [14, 15, 16, 17]
    greedy = ScriptedChatModel(script=actor_script)
    one = {name: column[:1] for name, column in rows.items()}
    assert reflection_reward([problem], actor=greedy, retry_samples=4)(["No idea."], one, never) == [0.0]
    assert len(greedy.bound) == 1 and "temperature" not in greedy.bound[0]  # greedy: one retry is enough
