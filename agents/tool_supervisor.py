"""A supervisor that acts through the bridge's tools instead of answering double, halve or keep.

The chat model gets the run's numbers (the `tools` prompt, like compact_stats) and the bridge's tools
(tools/bridge_tools.py: set the learning rate, set gradient clipping, pause, resume, save and load a
checkpoint, evaluate, read the state and metrics), and may call them: a LangGraph tool-calling agent,
model -> ToolNode -> model ... until the model answers without a tool call, or `max_tool_calls` rounds.
Any chat model with `bind_tools` works: an OpenAI-compatible endpoint (`--llm openai:MODEL --base-url
URL`) that supports tools, or the embedded model (`LocalChatModel`: grammar-constrained calls; its
"auto" choice often calls again after a tool result, so `max_tool_calls` bounds its turns). A chat
model without `bind_tools` is refused with a clear error.

The supervision graph records each turn as a decision like any other: its action is the direction the
learning rate went (double: up, halve: down, keep: unchanged), `lr_after` the rate the agent set, the
explanation the agent's final sentence, and `raw_output` every tool call it made (decision data).

    supervisor = ToolSupervisor(make_chat_model("openai:gpt-4o-mini"))
    run_supervision(url, supervisor)      # the graph hands it the bridge's tools (bind_bridge)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langgraph.errors import GraphRecursionError
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from selfsteer.agents.decision import MAX_EXPLANATION_WORDS
from selfsteer.agents.observation import Observation
from selfsteer.agents.supervisors import Decision, Supervisor, embedded_chat_model
from selfsteer.prompts import load_strategy
from selfsteer.tools.bridge_tools import BridgeTools

PROMPT = Path(__file__).resolve().parents[1] / "prompts" / "tools_supervisor.yaml"


def build_tool_agent(chat_model, tools: list):
    """model -> tools -> model ... -> end: the model's tool calls are run by a ToolNode and their
    results given back to it, until it answers without calling a tool."""
    model = chat_model.bind_tools(tools)

    def call_model(state: MessagesState) -> dict:
        return {"messages": [model.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", call_model)
    graph.add_node("tools", ToolNode(tools, handle_tool_errors=True))  # an error goes back to the model
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition, ["tools", END])
    graph.add_edge("tools", "model")
    return graph.compile()


class ToolSupervisor(Supervisor):
    """A chat model with tool calling acts on the run itself.

    max_tool_calls: rounds of tool calls per decision (each round may call several tools); past it the
        turn ends as a fallback (what was already done stays done, and is recorded).
    """

    name = "tools"
    acts_through_tools = True  # the graph sends no lr command of its own for this supervisor

    uses_chat_model = True

    @classmethod
    def from_options(cls, *, chat_model=None, strategy: str | None = None, option: str | None = None):
        return cls(chat_model or embedded_chat_model())

    def __init__(self, chat_model, max_tool_calls: int = 4):
        try:
            chat_model.bind_tools([])
        except NotImplementedError:
            raise ValueError(
                f"the tool supervisor needs a chat model that calls tools; {type(chat_model).__name__} does "
                "not: use the embedded model, or --llm openai:MODEL with an endpoint that supports tools"
            ) from None
        self.chat_model = chat_model
        self.prompt = load_strategy(str(PROMPT))
        self.strategy = self.prompt.id
        self.model = getattr(chat_model, "model_name", None) or type(chat_model).__name__
        self.max_tool_calls = max_tool_calls
        self.agent = None

    def bind_bridge(self, tools: BridgeTools) -> None:
        """The run to act on (the supervision graph calls this when it is built)."""
        self.agent = build_tool_agent(self.chat_model, tools.as_langchain_tools())

    def decide(self, observation: Observation) -> Decision:
        if self.agent is None:
            raise RuntimeError("ToolSupervisor has no run to act on: bind_bridge(tools) first")
        messages = [
            SystemMessage(self.prompt.system.strip()),
            HumanMessage(self.prompt.render_user(**observation.prompt_values())),
        ]
        started = time.perf_counter()
        fallback, error, state = False, None, {"messages": messages}
        try:
            limit = {"recursion_limit": 2 * self.max_tool_calls + 1}
            for latest in self.agent.stream({"messages": messages}, limit, stream_mode="values"):
                state = latest  # what was done so far survives an error below
        except GraphRecursionError:
            fallback, error = True, f"stopped after {self.max_tool_calls} rounds of tool calls"
        except Exception as failure:  # a failing model ends the turn; what it did stays recorded below
            fallback, error = True, f"{type(failure).__name__}: {failure}"
        turn = state["messages"][len(messages) :]
        calls = [
            {"name": c["name"], "args": c["args"]}
            for m in turn
            if isinstance(m, AIMessage)
            for c in m.tool_calls
        ]
        set_lrs = [c["args"].get("lr") for c in calls if c["name"] == "set_learning_rate"]
        lr_after = float(set_lrs[-1]) if set_lrs and set_lrs[-1] is not None else observation.lr
        action = "double" if lr_after > observation.lr else "halve" if lr_after < observation.lr else "keep"
        final = turn[-1].content if turn and isinstance(turn[-1], AIMessage) else ""
        explanation = error or " ".join(str(final).split()[:MAX_EXPLANATION_WORDS]) or "(no answer)"
        raw = json.dumps({"tool_calls": calls, "answer": final})
        return Decision(
            action,
            explanation,
            raw,
            fallback=fallback,
            latency_s=time.perf_counter() - started,
            acted=True,
            lr_after=lr_after,
        )
