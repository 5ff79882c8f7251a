"""The tool-using supervisor on a real tiny run, through langchain-openai's ChatOpenAI over real HTTP.

The model behind the endpoint is scripted (a stand-in for a remote model that calls tools; the embedded
model's own tool calls are tested in test_local_chat_tools.py): a small OpenAI-compatible server on loopback
(tests/helpers/openai_endpoint.py) answers /v1/chat/completions from a script and records what the
client sent."""

from __future__ import annotations

import json

import pytest
from helpers.openai_endpoint import scripted_endpoints
from helpers.self_correct import supervised_run

from selfsteer.agents.chat_models import make_chat_model
from selfsteer.agents.llm.chat import LocalChatModel
from selfsteer.agents.tool_supervisor import ToolSupervisor
from selfsteer.graphs.supervise import SelfCorrection, SupervisionContext
from selfsteer.trainer_bridge.store import Store


@pytest.fixture
def endpoint():
    with scripted_endpoints() as start:
        yield start


def test_the_tool_supervisor_acts_beyond_the_three_actions(tmp_path, endpoint):
    # First evaluation: clip harder and lower the lr (two tools in one round), then a sentence.
    # Second: save a checkpoint and evaluate, then a sentence. Later: nothing.
    server = endpoint(
        [
            [("set_gradient_clipping", {"max_grad_norm": 0.5}), ("set_learning_rate", {"lr": 0.04})],
            "Clipped to 0.5 and lowered the learning rate: the loss rose.",
            [("save_checkpoint", {}), ("evaluate", {})],
            "Saved a checkpoint and evaluated; the run looks steady.",
        ]
    )
    supervisor = ToolSupervisor(make_chat_model("openai:scripted", base_url=server.url, api_key="none"))
    summary, _, db = supervised_run(tmp_path, supervisor, 0.1, None)
    with Store(db) as store:
        journal = [c for c in store.list_commands(summary["run_id"]) if c["source"] == "tools"]
        decisions = store.list_decisions(summary["run_id"])

    # The agent's commands, applied by the run (a round's tools run side by side: any order within it);
    # the loop sent no lr command of its own.
    acted = [
        (c["type"], c["status"], json.dumps(c["args"]))
        for c in journal
        if c["type"] not in ("pause", "resume")
    ]
    assert sorted(acted[:2]) == [
        ("set_max_grad_norm", "success", '{"value": 0.5}'),
        ("set_optimizer", "success", '{"lr": 0.04}'),
    ]
    assert sorted(acted[2:]) == [("evaluate", "success", "{}"), ("save_checkpoint", "success", "{}")]
    first, second = decisions[0], decisions[1]
    assert (first["action"], first["lr_before"], first["lr_after"]) == ("halve", 0.1, 0.04)
    assert first["explanation"] == "Clipped to 0.5 and lowered the learning rate: the loss rose."
    raw = json.loads(first["raw_output"])
    assert [c["name"] for c in raw["tool_calls"]] == ["set_gradient_clipping", "set_learning_rate"]
    assert (second["action"], second["lr_after"]) == ("keep", 0.04)
    assert first["strategy"] == "tools@v1"
    # What went over the wire: the OpenAI tools schema, and the tool results back to the model.
    offered = {t["function"]["name"] for t in server.requests[0]["tools"]}
    assert {"set_learning_rate", "set_gradient_clipping", "save_checkpoint", "load_checkpoint", "evaluate",
            "pause_training", "resume_training"} <= offered  # the tools a run offers # fmt: skip
    assert [m["role"] for m in server.requests[1]["messages"]][-2:] == ["tool", "tool"]


def test_the_tool_supervisor_needs_a_model_that_calls_tools_and_no_self_correction(tmp_path, endpoint):
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel

    with pytest.raises(ValueError, match="calls tools"):  # LangChain's fake chat models have no bind_tools
        ToolSupervisor(GenericFakeChatModel(messages=iter([])))
    ToolSupervisor(LocalChatModel())  # the embedded model calls tools now
    server = endpoint([])
    supervisor = ToolSupervisor(make_chat_model("openai:scripted", base_url=server.url, api_key="none"))
    with pytest.raises(ValueError, match="self-correction"):
        SupervisionContext(None, supervisor, self_correct=SelfCorrection())
