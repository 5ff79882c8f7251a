"""Both loops for LangGraph Studio: `langgraph dev` at the repository root reads langgraph.json, which
names the two factories below.

- `reflect`: the self-correction loop (graphs/reflect.py) on one problem of a task. Studio's input is
  JSON, and a problem carries its validator, so a first node, `problem`, draws it: give
  `{"index": 0}` (the index-th problem of the task's test split; `seed` picks another draw).
- `supervise`: the supervision loop (graphs/supervise.py) on the run a control server serves
  (`selfsteer train ... --port 7007`): give `{"max_iterations": 20}`.

The factories are coroutines: the server calls them in its event loop, where the file reads of a
build (prompt strategies, tasks) would block it (`langgraph dev` refuses blocking calls there), so
they build in a worker thread; `build_reflect` and `build_supervise` are the same, synchronous.
Each builds its graph without a checkpointer (`langgraph dev` refuses a graph that brings its
own: the server persists threads itself) and without a store (Studio's runs stay out of
selfsteer.sqlite). Nothing is loaded or contacted while a graph is built: the embedded model loads at
its first call, and the bridge client connects at its first request.

Settings, from the run's configurable (Studio's "configuration"), else the environment, else the default:

    task          SELFSTEER_TASK        countdown (or countdown:N, bfcl:CATEGORY, module:function)
    llm           SELFSTEER_LLM         local (the embedded SmolLM2-135M-Instruct) or openai:MODEL
    url           SELFSTEER_URL         http://127.0.0.1:7007 (the run's control server)
    token         SELFSTEER_TOKEN       none (the control server's bearer token)
    supervisor    SELFSTEER_SUPERVISOR  llm (rule, plateau, intervener, tools, module:Class ...)
    strategy      SELFSTEER_STRATEGY    json_history (the prompt strategy of the llm supervisor)

openai:MODEL also reads $SELFSTEER_BASE_URL / $OPENAI_BASE_URL and the API key as `--llm` does.
"""

from __future__ import annotations

import asyncio
import os

from langchain_core.runnables import RunnableConfig, RunnableLambda
from langgraph.graph import START, StateGraph

from selfsteer.agents.chat_models import make_chat_model
from selfsteer.agents.registry import make_supervisor, needs_chat_model
from selfsteer.evals.tasks import load_task
from selfsteer.graphs.reflect import EpisodeState, build_graph
from selfsteer.graphs.supervise import SupervisionContext, SupervisionState, supervision_graph
from selfsteer.tools.bridge_tools import BridgeTools
from selfsteer.trainer_bridge.client import BridgeClient

DEFAULTS = {
    "task": ("SELFSTEER_TASK", "countdown"),
    "llm": ("SELFSTEER_LLM", "local"),
    "url": ("SELFSTEER_URL", "http://127.0.0.1:7007"),
    "token": ("SELFSTEER_TOKEN", None),
    "supervisor": ("SELFSTEER_SUPERVISOR", "llm"),
    "strategy": ("SELFSTEER_STRATEGY", "json_history"),
}


def setting(config: RunnableConfig | None, name: str) -> str | None:
    """A setting: the config's configurable, else its environment variable, else its default."""
    env, default = DEFAULTS[name]
    given = ((config or {}).get("configurable") or {}).get(name)
    return given or os.environ.get(env) or default


def _chat_model(config: RunnableConfig | None):
    return make_chat_model(setting(config, "llm"))  # the embedded model loads at its first call


class StudioEpisodeState(EpisodeState, total=False):
    index: int  # which problem of the task's test split
    seed: int


def build_reflect(config: RunnableConfig | None = None):
    """The self-correction loop: `problem` (draws the index-th problem of the task) -> the loop of
    graphs/reflect.py as a subgraph (attempt, validate, reflect, retry, reward)."""
    task = setting(config, "task")
    episode = build_graph(_chat_model(config), model_name=setting(config, "llm"))

    def problem(state: StudioEpisodeState) -> dict:
        if state.get("problem") is not None:  # given by a caller in Python
            return {}
        index = int(state.get("index") or 0)
        problems = load_task(task, split="test", n=index + 1, seed=int(state.get("seed") or 0))
        if index >= len(problems):
            raise ValueError(f"{task} has {len(problems)} test problems: index {index} is out of range")
        return {"problem": problems[index]}

    graph = StateGraph(StudioEpisodeState)
    graph.add_node("problem", problem)
    graph.add_node("episode", episode)
    graph.add_edge(START, "problem")
    graph.add_edge("problem", "episode")
    return graph.compile()


def build_supervise(config: RunnableConfig | None = None):
    """The supervision loop of graphs/supervise.py on the run served at the `url` setting."""
    spec = setting(config, "supervisor")
    chat_model = _chat_model(config) if needs_chat_model(spec) else None
    supervisor = make_supervisor(spec, chat_model=chat_model, strategy=setting(config, "strategy"))
    if supervisor is None:
        raise ValueError("supervisor none: nothing to show; choose rule, llm, ... (SELFSTEER_SUPERVISOR)")
    client = BridgeClient(setting(config, "url"), token=setting(config, "token"), source="studio")
    context = SupervisionContext(BridgeTools(client), supervisor)
    loop = supervision_graph()  # a closure variable: how LangGraph finds the subgraph (to draw it)

    def supervise(state: SupervisionState, config: RunnableConfig) -> dict:
        return loop.invoke(state, config, context=context)

    # Studio gives a state alone: the loop runs as a subgraph of one node that gives it its context.
    graph = StateGraph(SupervisionState)
    graph.add_node("supervise", RunnableLambda(supervise, name="supervise"))
    graph.add_edge(START, "supervise")
    return graph.compile()


async def reflect(config: RunnableConfig | None = None):
    """langgraph.json's `reflect`: `build_reflect` in a worker thread."""
    return await asyncio.to_thread(build_reflect, config)


async def supervise(config: RunnableConfig | None = None):
    """langgraph.json's `supervise`: `build_supervise` in a worker thread."""
    return await asyncio.to_thread(build_supervise, config)
