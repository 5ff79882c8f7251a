"""Reflect, Retry, Reward (Bensal et al. 2025) as a LangGraph state machine.

    open_episode -> attempt -> validate --pass / out of retries--> reward -> END
                                  |
                                  +--fail--> reflect -> retry -> validate -> ...

A model answers a problem; the problem's validator says pass or fail; on a failure the model writes
a short reflection and tries again with it in context; a reflection earns reward 1 when the attempt
right after it passes. `ReflectConfig.max_retries` caps the loop (LangGraph's recursion limit is a
safety net, not a cap). Every episode, attempt, verdict, reflection and reward goes to the store.

The graph is built once, without dependencies (`episode_graph()`); its nodes (`open_episode`,
`attempt`, `validate`, `route`, `reflect`, `retry`, `reward`; each registered through
`finished_if_it_breaks`, so a broken episode's store row ends "failed") are module-level functions of
the state and LangGraph's `runtime`, whose `context` is a `ReflectContext` (the model, the `ReflectConfig`, the store, the
memory, the run's labels) given at invoke time:
`episode_graph().invoke({"problem": problem}, context=ReflectContext(llm, config, store))`.
`build_graph(llm, config, ...)` is that graph with its context bound, for callers that pass a state alone.

Strategies (compare them on the same problems):
- `retry`: no reflection; the model is told its answer was wrong and tries again;
- `reflect`: the retry sees the task and the reflection, not the failed attempt;
- `reflect_attempt`: the retry continues the conversation: task, failed attempt, reflection (the paper's);
- `memory`: `reflect_attempt`, plus the rewarded reflections of earlier episodes in the system prompt.

Problems with tools (`Problem.tools`, e.g. BFCL in tools mode): the attempt and the retry call the
model with the tools bound (`llm.bind_tools(tools, tool_choice=problem.tool_choice)`), and the answer is
`render_tool_calls(message)`, the JSON rendering `[{"name": ..., "arguments": {...}}]` of the model's
tool calls, which is what the validator reads and what the retry conversation shows as the failed
attempt. The reflection is always plain text: the model is called without tools.

Besides the graph: `run_episodes` (many episodes at once: their model calls share batched forward
passes), `mine_failures` (first attempts in one batch, failures kept, the GRPO training set) and
`reflection_reward` (the GRPO reward: does the retry with this reflection pass?).
"""

from __future__ import annotations

import functools
import itertools
import json
import operator
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Annotated, Any, TypedDict

from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from tqdm import tqdm

from selfsteer.prompts import REFLECT_STRATEGIES, ReflectStrategy, load_prompts
from selfsteer.tools.tasks import Problem
from selfsteer.trainer_bridge.records import EpisodeAttempt, EpisodeReflection, NewEpisode
from selfsteer.trainer_bridge.store import Store

Message = dict[str, str]  # {"role": ..., "content": ...}: what chat models and TRL both read


@dataclass
class ReflectConfig:
    strategy: ReflectStrategy = "reflect_attempt"
    max_retries: int = 1  # retries after the first attempt: the loop's explicit cap
    prompts: str = "v1"  # prompts/reflect_{prompts}.yaml
    memory_size: int = 5  # strategy "memory": how many rewarded reflections to remember

    def __post_init__(self):
        if self.strategy not in REFLECT_STRATEGIES:
            raise ValueError(f"strategy must be one of {REFLECT_STRATEGIES}, not {self.strategy!r}")
        if self.max_retries < 0:
            raise ValueError("max_retries must be 0 or more")


class ReflectionMemory:
    """Rewarded reflections remembered across episodes (strategy `memory`); thread-safe."""

    def __init__(self, size: int = 5):
        self._items: deque[str] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, text: str) -> None:
        with self._lock:
            self._items.append(text.strip())

    def lessons(self) -> list[str]:
        with self._lock:
            return list(self._items)


# -----------------------------------------------------------------------------
# state


class Attempt(TypedDict, total=False):
    prompt: list[Message]
    response: str
    passed: bool
    reason: str
    cost: float | None  # the verdict's cost (the decisions task's regret), where the task measures one


class Reflection(TypedDict):
    text: str
    n_tokens: int
    after_attempt: int
    id: int | None  # row in the store


class EpisodeState(TypedDict, total=False):
    problem: Problem
    episode_id: int | None
    pending: Attempt | None  # the latest answer, not yet validated
    attempts: Annotated[list[Attempt], operator.add]
    reflections: Annotated[list[Reflection], operator.add]
    lessons: list[str]  # strategy memory: what earlier episodes taught, fixed at the episode's start
    rewards: list[float]  # one per reflection, set at the end


# -----------------------------------------------------------------------------
# prompts: which messages each step sees


def first_messages(problem: Problem, lessons: Sequence[str] = (), version: str = "v1") -> list[Message]:
    system = problem.system
    if lessons:
        memory = load_prompts(version)["memory"].format(lessons="\n".join(f"- {x}" for x in lessons))
        system = f"{system}\n\n{memory}" if system else memory
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": problem.prompt}]


def _conversation(
    first: list[Message],
    attempts: Sequence[str],
    reflections: Sequence[str],
    version: str,
    reasons: Sequence[str] = (),
):
    """The task, then each failed attempt followed by its reflection (if any). A task's own texts may
    cite the validator's reason for each failure (`{reason}`); v1's do not."""
    prompts = load_prompts(version)
    messages = list(first)
    for index, attempt in enumerate(attempts):
        messages.append({"role": "assistant", "content": attempt})
        if index < len(reflections):
            messages.append({"role": "user", "content": _why(prompts["reflect"], reasons, index)})
            messages.append({"role": "assistant", "content": reflections[index]})
    return messages


def _why(template: str, reasons: Sequence[str], index: int) -> str:
    return template.format(reason=reasons[index] if index < len(reasons) else "")


def reflect_messages(
    problem: Problem,
    attempts: Sequence[str],
    reflections: Sequence[str] = (),
    lessons=(),
    version="v1",
    reasons: Sequence[str] = (),
) -> list[Message]:
    """What the model sees when asked to reflect: the task, the failed attempt(s), the instruction.
    This is also the prompt of GRPO training: its completion is the reflection. `reasons`: the
    validator's reason for each failed attempt, for texts that cite it."""
    messages = _conversation(
        first_messages(problem, lessons, version), attempts, reflections, version, reasons
    )
    instruction = _why(load_prompts(version)["reflect"], reasons, len(attempts) - 1)
    return messages + [{"role": "user", "content": instruction}]


def retry_messages(
    problem: Problem,
    strategy: ReflectStrategy,
    attempts: Sequence[str],
    reflections: Sequence[str] = (),
    lessons: Sequence[str] = (),
    version: str = "v1",
    reasons: Sequence[str] = (),
) -> list[Message]:
    prompts = load_prompts(version)
    first = first_messages(problem, lessons if strategy == "memory" else (), version)
    if strategy == "retry":
        messages = list(first)
        for index, attempt in enumerate(attempts):
            messages += [
                {"role": "assistant", "content": attempt},
                {"role": "user", "content": _why(prompts["plain_retry"], reasons, index)},
            ]
        return messages
    if strategy == "reflect":
        user = prompts["retry_with_reflection"].format(prompt=problem.prompt, reflection=reflections[-1])
        return first[:-1] + [{"role": "user", "content": user}]
    messages = _conversation(first, attempts, reflections, version, reasons)
    return messages + [{"role": "user", "content": prompts["retry_after_reflection"]}]


# -----------------------------------------------------------------------------
# the graph


def _text(message: Any) -> str:
    content = getattr(message, "content", message)
    return content if isinstance(content, str) else str(content)


def render_tool_calls(message: Any) -> str:
    """The answer of a message: its tool calls as JSON, `[{"name": ..., "arguments": {...}}]` (calls
    whose arguments were not valid JSON keep them as the raw string, so the validator can say so), or,
    with no tool call, its text content."""
    calls = [{"name": c["name"], "arguments": c["args"]} for c in getattr(message, "tool_calls", None) or []]
    calls += [
        {"name": c.get("name") or "", "arguments": c.get("args") or ""}
        for c in getattr(message, "invalid_tool_calls", None) or []
    ]
    return json.dumps(calls, ensure_ascii=False) if calls else _text(message)


def _with_tools(llm: BaseChatModel, problem: Problem):
    """The model that answers the problem: with the problem's tools bound, if it has any."""
    if not problem.tools:
        return llm
    options = {"tool_choice": problem.tool_choice} if problem.tool_choice is not None else {}
    try:
        return llm.bind_tools(list(problem.tools), **options)
    except NotImplementedError as error:
        raise ValueError(
            f"{type(llm).__name__} cannot call tools, and {problem.task or 'this task'} offers tools: use a "
            "chat model that calls tools, or text mode (--call-mode text)"
        ) from error


def _answer(llm: BaseChatModel, problem: Problem, messages: list[Message], **options: Any) -> str:
    """An attempt at the problem: the model's tool calls (rendered) if the problem has tools, else text.
    `options` go to the model's call (temperature, seed)."""
    message = _with_tools(llm, problem).invoke(messages, **options)
    return render_tool_calls(message) if problem.tools else _text(message)


def _n_tokens(message: Any) -> int:
    usage = getattr(message, "usage_metadata", None) or {}
    return int(usage.get("output_tokens") or len(_text(message).split()))


@dataclass
class ReflectContext:
    """What an episode runs with, given at invoke time (LangGraph's run context):
    `episode_graph().invoke(state, context=ReflectContext(llm, ...))`. The nodes read it from
    `runtime.context`. `memory` (strategy `memory`): one per context unless given, so the episodes run
    with one context share what they learn. `reflector`: the model that writes the reflections, where it
    is not `llm` (a trained reflector beside a frozen actor, Retroformer's split); None: `llm`."""

    llm: BaseChatModel
    config: ReflectConfig = field(default_factory=ReflectConfig)
    store: Store | None = None
    memory: ReflectionMemory | None = None
    model_name: str | None = None
    run_id: str | None = None
    seed: int | None = None
    reflector: BaseChatModel | None = None

    def __post_init__(self):
        if self.memory is None:
            self.memory = ReflectionMemory(self.config.memory_size)

    def new_episode(self, problem: Problem) -> NewEpisode:
        """The store row of an episode on `problem`."""
        return NewEpisode(
            task=problem.task or "custom",
            task_id=problem.id,
            strategy=self.config.strategy,
            model=self.model_name,
            seed=self.seed,
            run_id=self.run_id,
        )


# the nodes: each reads the state and the run's context, and returns the state's update


def open_episode(state: EpisodeState, runtime: Runtime[ReflectContext]) -> dict:
    """The episode's store row (unless the caller opened one), and what it starts with: the lessons of
    earlier episodes (strategy `memory`). A node of its own, so that an episode whose model fails at its
    first attempt has a row to finish as "failed"."""
    context = runtime.context
    episode_id = state.get("episode_id")
    if context.store is not None and episode_id is None:
        episode_id = context.store.add_episode(context.new_episode(state["problem"]))
    lessons = context.memory.lessons() if context.config.strategy == "memory" else []
    return {"episode_id": episode_id, "lessons": lessons}


def attempt(state: EpisodeState, runtime: Runtime[ReflectContext]) -> dict:
    """The first answer: the problem's given one (`Problem.first_answer`), else the model's."""
    context, problem = runtime.context, state["problem"]
    messages = first_messages(problem, state.get("lessons") or [], _version(problem, context.config))
    if problem.first_answer is not None:
        response = problem.first_answer
    else:
        response = _answer(context.llm, problem, messages)
    return {"pending": Attempt(prompt=messages, response=response, passed=False, reason="")}


def validate(state: EpisodeState, runtime: Runtime[ReflectContext]) -> dict:
    """The problem's validator on the pending answer: pass or fail, its reason and its cost."""
    pending, problem, store = state["pending"], state["problem"], runtime.context.store
    verdict = problem.validate(pending["response"])
    done = Attempt(
        prompt=pending["prompt"],
        response=pending["response"],
        passed=verdict.passed,
        reason=verdict.reason,
        cost=verdict.cost,
    )
    if store is not None:
        row = EpisodeAttempt(
            attempt_index=len(state["attempts"]),
            prompt=_render(done["prompt"], problem),
            response=done["response"],
            passed=done["passed"],
            reason=done["reason"],
        )
        store.add_attempt(state["episode_id"], row)
    return {"attempts": [done], "pending": None}


def route(state: EpisodeState, runtime: Runtime[ReflectContext]) -> str:
    """After a verdict: done on a pass or out of retries, else a retry (with a reflection first,
    unless the strategy is the plain `retry`)."""
    config = runtime.context.config
    if state["attempts"][-1]["passed"] or len(state["attempts"]) > config.max_retries:
        return "reward"
    return "retry" if config.strategy == "retry" else "reflect"


def reflect(state: EpisodeState, runtime: Runtime[ReflectContext]) -> dict:
    """The reflection on the failed attempt(s), in plain text (no tools bound): the context's reflector's,
    else the model's."""
    context, problem = runtime.context, state["problem"]
    attempts = [a["response"] for a in state["attempts"]]
    messages = reflect_messages(
        problem,
        attempts,
        [r["text"] for r in state["reflections"]],
        state.get("lessons", ()),
        _version(problem, context.config),
        [a["reason"] for a in state["attempts"]],
    )
    answer = (context.reflector or context.llm).invoke(messages)
    text, n_tokens, after = _text(answer).strip(), _n_tokens(answer), len(attempts) - 1
    row = None
    if context.store is not None:
        noted = EpisodeReflection(after_attempt=after, text=text, n_tokens=n_tokens)
        row = context.store.add_reflection(state["episode_id"], noted)
    return {"reflections": [Reflection(text=text, n_tokens=n_tokens, after_attempt=after, id=row)]}


def retry(state: EpisodeState, runtime: Runtime[ReflectContext]) -> dict:
    """Another answer, with what the strategy shows of the failures: the problem's own actor answers
    it (`Problem.actor`), else the model."""
    context, problem = runtime.context, state["problem"]
    messages = retry_messages(
        problem,
        context.config.strategy,
        [a["response"] for a in state["attempts"]],
        [r["text"] for r in state["reflections"]],
        state.get("lessons", ()),
        _version(problem, context.config),
        [a["reason"] for a in state["attempts"]],
    )
    if problem.actor is not None:
        response = problem.actor(messages)
    else:
        response = _answer(context.llm, problem, messages)
    return {"pending": Attempt(prompt=messages, response=response, passed=False, reason="")}


def reward(state: EpisodeState, runtime: Runtime[ReflectContext]) -> dict:
    """A reflection earns 1 when the attempt right after it passed, else 0; strategy `memory`
    remembers the rewarded ones. Finishes the episode's store row."""
    context, attempts = runtime.context, state["attempts"]
    rewards = []
    for reflection in state["reflections"]:
        value = float(attempts[reflection["after_attempt"] + 1]["passed"])
        rewards.append(value)
        if context.store is not None and reflection["id"] is not None:
            context.store.set_reflection_reward(reflection["id"], value)
        if value and context.config.strategy == "memory":
            context.memory.add(reflection["text"])
    if context.store is not None:
        passed_first, passed_final = attempts[0]["passed"], attempts[-1]["passed"]
        context.store.finish_episode(state["episode_id"], "finished", passed_first, passed_final)
    return {"rewards": rewards}


def finished_if_it_breaks(node: Callable) -> Callable:
    """`node`, which finishes its episode's store row as "failed" when it raises (a model error), so that
    no broken episode is left "running"; the error then ends the episode (`run_episodes` raises it)."""

    @functools.wraps(node)
    def guarded(state: EpisodeState, runtime: Runtime[ReflectContext]) -> Any:
        try:
            return node(state, runtime)
        except Exception:
            if runtime.context.store is not None and state.get("episode_id") is not None:
                runtime.context.store.finish_episode(state["episode_id"], "failed", False, False)
            raise

    return guarded


@functools.cache
def episode_graph() -> CompiledStateGraph:
    """The compiled self-correction graph, built once: invoke it with `{"problem": problem}` and
    `context=ReflectContext(llm, ...)`."""
    graph = StateGraph(EpisodeState, context_schema=ReflectContext)
    for node in (open_episode, attempt, validate, reflect, retry, reward):
        graph.add_node(node.__name__, finished_if_it_breaks(node))
    graph.add_edge(START, "open_episode")
    graph.add_edge("open_episode", "attempt")
    graph.add_edge("attempt", "validate")
    graph.add_conditional_edges("validate", route, ["reflect", "retry", "reward"])
    graph.add_edge("reflect", "retry")
    graph.add_edge("retry", "validate")
    graph.add_edge("reward", END)
    return graph.compile()


def build_graph(
    llm: BaseChatModel,
    config: ReflectConfig | None = None,
    store: Store | None = None,
    memory: ReflectionMemory | None = None,
    *,
    model_name: str | None = None,
    run_id: str | None = None,
    seed: int | None = None,
) -> RunnableLambda:
    """`episode_graph()` with its context bound, for callers that invoke it with a state alone:
    `.invoke({"problem": problem}, config)`, or as a node of another graph (Studio's), where it runs
    as a subgraph (a runnable whose function calls a graph is one to LangGraph: drawn, streamed)."""
    context = ReflectContext(llm, config or ReflectConfig(), store, memory, model_name, run_id, seed)
    graph = episode_graph()  # a closure variable: how LangGraph finds the subgraph (to draw it)

    def episode(state: EpisodeState, config: RunnableConfig) -> dict:
        return graph.invoke(state, config, context=context)

    return RunnableLambda(episode, name="episode")


def _version(problem: Problem, config: ReflectConfig) -> str:
    """The loop texts a problem is run with: its task's own (`Problem.prompts`), else the run's."""
    return problem.prompts or config.prompts


def _render(messages: list[Message], problem: Problem | None = None) -> str:
    text = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)
    if problem is not None and problem.tools:  # what the model was offered besides the messages
        names = ", ".join(tool["function"]["name"] for tool in problem.tools)
        text = f"[tools, tool_choice={problem.tool_choice}]\n{names}\n\n{text}"
    return text


# -----------------------------------------------------------------------------
# many episodes


@dataclass
class EpisodeResult:
    problem_id: str
    passed_first: bool
    passed_final: bool
    attempts: list[Attempt]
    reflections: list[Reflection] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    episode_id: int | None = None

    @classmethod
    def from_state(cls, state: EpisodeState) -> EpisodeResult:
        attempts = state["attempts"]
        return cls(
            problem_id=state["problem"].id,
            passed_first=attempts[0]["passed"],
            passed_final=attempts[-1]["passed"],
            attempts=attempts,
            reflections=state.get("reflections", []),
            rewards=state.get("rewards", []),
            episode_id=state.get("episode_id"),
        )


def run_episodes(
    llm: BaseChatModel,
    problems: Sequence[Problem],
    config: ReflectConfig | None = None,
    store: Store | None = None,
    *,
    concurrency: int = 32,
    progress: bool = False,
    memory: ReflectionMemory | None = None,
    **graph_options: Any,
) -> list[EpisodeResult]:
    """One episode per problem through `episode_graph().batch_as_completed`, `concurrency` at a time on
    threads: their model calls reach the chat model at once, and the embedded model serves concurrent
    calls as one padded batch. Results come back in the order of `problems`. An episode that breaks is
    finished as "failed" in the store (`finished_if_it_breaks`); the others run to their end, then its
    error is raised."""
    config = config or ReflectConfig()
    context = ReflectContext(llm, config, store, memory, **graph_options)
    options = {
        "recursion_limit": 4 * (config.max_retries + 1) + 8,  # above the cap; never what stops it
        "max_concurrency": max(1, concurrency),
    }
    inputs = [{"problem": problem} for problem in problems]
    done = episode_graph().batch_as_completed(inputs, options, return_exceptions=True, context=context)
    if progress:
        done = tqdm(done, total=len(inputs), desc=f"episodes ({config.strategy})", unit="ep")
    results: list[EpisodeResult | Exception | None] = [None] * len(inputs)
    for index, output in done:
        results[index] = output if isinstance(output, Exception) else EpisodeResult.from_state(output)
    failed = next((r for r in results if isinstance(r, Exception)), None)
    if failed is not None:  # the others ran to their end, their rows finished; a broken one's "failed"
        raise failed
    return results  # type: ignore[return-value]


# -----------------------------------------------------------------------------
# training data and reward for GRPO (selfsteer.graphs.grpo_reflection)


def mine_failures(
    llm: BaseChatModel,
    problems: Sequence[Problem],
    version: str = "v1",
    *,
    chunk: int = 32,
    progress: bool = False,
) -> list[dict]:
    """First attempts at every problem (batched, `chunk` prompts per call), the failures kept as GRPO
    training rows: `prompt` (task + failed attempt + the reflect instruction), `problem_id`,
    `failed_attempt`, `reason` (the validator's). A problem's given first answer (`first_answer`) is
    used as it is. Problems with tools cannot share one call (each binds its own tools): they are
    answered by `chunk` concurrent calls instead, which the embedded model serves as one batch."""
    asked = [problem for problem in problems if problem.first_answer is None]
    prompts = [first_messages(problem, (), version) for problem in asked]
    if any(problem.tools for problem in asked):
        answers = _concurrent_answers(llm, asked, prompts, chunk, progress)
    else:
        starts = range(0, len(prompts), chunk)
        if progress:
            starts = tqdm(starts, desc="first attempts", unit=f"x{chunk}")
        answers = [_text(a) for start in starts for a in llm.batch(prompts[start : start + chunk])]
    by_id = dict(zip((problem.id for problem in asked), answers, strict=True))
    rows = []
    for problem in problems:
        response = problem.first_answer if problem.first_answer is not None else by_id[problem.id]
        verdict = problem.validate(response)
        if not verdict.passed:
            own = problem.prompts or version
            rows.append(
                {
                    "prompt": reflect_messages(problem, [response], version=own, reasons=[verdict.reason]),
                    "problem_id": problem.id,
                    "failed_attempt": response,
                    "reason": verdict.reason,
                }
            )
    return rows


def _concurrent_answers(
    llm: BaseChatModel,
    problems: Sequence[Problem],
    prompts: list[list[Message]],
    workers: int,
    progress: bool,
) -> list[str]:
    responses: list[str] = [""] * len(problems)
    with ThreadPoolExecutor(max(1, min(workers, len(problems)))) as pool:
        futures = {
            pool.submit(_answer, llm, problem, prompt): index
            for index, (problem, prompt) in enumerate(zip(problems, prompts, strict=True))
        }
        done = as_completed(futures)
        if progress:
            done = tqdm(done, total=len(futures), desc="first attempts", unit="call")
        for future in done:
            responses[futures[future]] = future.result()
    return responses


def reflection_reward(
    problems: Sequence[Problem],
    strategy: ReflectStrategy = "reflect_attempt",
    version: str = "v1",
    *,
    actor: BaseChatModel | None = None,
    retry_temperature: float = 0.0,
    retry_samples: int = 1,
    seed: int = 0,
) -> Callable[..., list[float]]:
    """The GRPO reward of reflections: the share of the retries with the reflection in context that pass
    (with one retry: 1 when it passes, else 0).

    The returned function takes (reflections, rows, generate): rows are the dataset columns
    (`problem_id`, `failed_attempt`, `reason`), `generate` answers a list of conversations with the policy
    being trained, so the retry is the current policy's, unless the problem has its own actor
    (`Problem.actor`, Retroformer's frozen actor), which then answers it. `generate` writes plain text, so
    a problem with tools (whose retry is a tool call) is answered by `actor`, a chat model that calls tools
    (the frozen embedded model: only the reflection is trained), with the problem's tools bound and its
    calls decoded under their grammar: `retry_samples` retries each, sampled at `retry_temperature` (0:
    greedy, one is enough), seeded by `seed` and the order they are drawn in, so a run is reproducible."""
    if retry_samples < 1:
        raise ValueError(f"retry_samples must be 1 or more, not {retry_samples}")
    with_tools = [problem.id for problem in problems if problem.tools and problem.actor is None]
    if with_tools and actor is None:
        raise ValueError(
            f"{len(with_tools)} problem(s) offer tools (e.g. {with_tools[0]}): their retries are tool calls, "
            "so the reward needs an actor, a chat model that calls tools (actor=...), or text mode"
        )
    by_id = {problem.id: problem for problem in problems}
    samples = retry_samples if retry_temperature > 0 else 1
    seeds = itertools.count(seed)  # every sampled retry, in the order drawn, gets a seed of its own

    def tool_retry(problem: Problem, messages: list[Message], call_seed: int) -> str:
        options = {"temperature": retry_temperature, "seed": call_seed} if retry_temperature > 0 else {}
        return _answer(actor, problem, messages, **options)

    def reward(
        reflections: list[str], rows: dict[str, list], generate: Callable[[list[list[Message]]], list[str]]
    ) -> list[float]:
        reasons = rows.get("reason") or [""] * len(reflections)
        batch = [
            retry_messages(
                by_id[pid],
                strategy,
                [failed],
                [reflection.strip()],
                version=by_id[pid].prompts or version,
                reasons=[reason],
            )
            for pid, failed, reflection, reason in zip(
                rows["problem_id"], rows["failed_attempt"], reflections, reasons, strict=True
            )
        ]
        problem_of = [by_id[pid] for pid in rows["problem_id"]]
        retries: list[list[str] | None] = [None] * len(batch)
        acted = [i for i, problem in enumerate(problem_of) if problem.actor is not None]
        called = [i for i, problem in enumerate(problem_of) if problem.actor is None and problem.tools]
        jobs = [(i, problem_of[i].actor, batch[i]) for i in acted]
        for i in called:
            for _ in range(samples):
                retry = functools.partial(tool_retry, problem_of[i], call_seed=next(seeds))
                jobs.append((i, retry, batch[i]))
        if jobs:
            with ThreadPoolExecutor(len(jobs)) as pool:  # the actor's engine batches concurrent calls
                answers = list(pool.map(lambda job: job[1](job[2]), jobs))
            for (i, _, _), answer in zip(jobs, answers, strict=True):
                retries[i] = [*(retries[i] or []), answer]
        generated = [i for i in range(len(batch)) if retries[i] is None]
        if generated:
            for i, answer in zip(generated, generate([batch[i] for i in generated]), strict=True):
                retries[i] = [answer]
        return [
            sum(problem.validate(answer).passed for answer in answers) / len(answers)
            for problem, answers in zip(problem_of, retries, strict=True)
        ]

    return reward
