"""The intervener: TRL SFT of a LoRA adapter on collected counterfactual rows (a real, short training),
the shipped adapter and its card, and `--supervisor intervener` steering a real run."""

import json
import math
import shutil

import pytest
from helpers.cli import selfsteer
from safetensors.torch import load_file

from selfsteer.agents.intervener import ADAPTER_DIR, IntervenerSupervisor
from selfsteer.agents.intervener_data import explain, grounded, observation_of, read_rows
from selfsteer.agents.supervisors import ACTIONS
from selfsteer.evals.counterfactual import CollectConfig, RunSpec, collect
from selfsteer.trainer_bridge.store import Store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_intervener_train_fits_an_adapter_and_scores_it(tmp_path):
    data = tmp_path / "cf"
    specs = [
        RunSpec(shape="tiny", lr=lr, seed=seed, max_steps=30) for seed in (0, 3) for lr in (1.5625e-4, 0.64)
    ]
    collect(CollectConfig(out=str(data), specs=specs), progress=False)
    out = tmp_path / "adapter"
    said = selfsteer("intervener", "train", "--data", str(data), "--out", str(out), "--examples", "8")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 1 and metrics["train_examples"] <= 8
    assert metrics["validation_rows"] == 4  # the seed-3 runs: two decision points each
    for policy in ("intervener", "keep", "rule"):
        assert 0 <= metrics["validation"][policy]["accuracy"] <= 1
    assert '"intervener"' in said.stdout
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all(str(t.dtype) == "torch.float16" for t in weights.values())
    card = (out / "README.md").read_text()
    assert "selfsteer intervener train" in card and "Validation" in card
    bias = json.loads((out / "calibration.json").read_text())["choice_bias"]["action"]
    assert set(bias) == set(ACTIONS) and bias == metrics["choice_bias"]
    # -log(mean probability) over the scored rows: the three mean probabilities sum to one
    assert sum(math.exp(-b) for b in bias.values()) == pytest.approx(1.0)


def test_calibration_bias_moves_the_answer_in_process_and_served(tmp_path):
    """The engine adds an adapter's choice bias wherever a structured answer picks an action."""
    from selfsteer.agents.chat_models import make_chat_model
    from selfsteer.agents.local_llm import get_local_engine
    from selfsteer.agents.openai_server import create_app
    from selfsteer.trainer_bridge.testing import serving

    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER_DIR, adapter)
    (adapter / "calibration.json").write_text(json.dumps({"choice_bias": {"action": {"halve": 100.0}}}))
    observations = [observation_of(r) for r in read_rows([ADAPTER_DIR / "examples.jsonl"])]
    assert {IntervenerSupervisor().decide(o).action for o in observations} != {"halve"}
    assert {IntervenerSupervisor(adapter).decide(o).action for o in observations} == {"halve"}
    with serving(create_app(get_local_engine(adapter=adapter))) as url:
        served = IntervenerSupervisor(
            adapter, chat_model=make_chat_model("openai:intervener", base_url=f"{url}/v1")
        )
        assert {served.decide(o).action for o in observations} == {"halve"}


def test_the_shipped_adapter_is_small_and_carded():
    size = (ADAPTER_DIR / "adapter_model.safetensors").stat().st_size
    assert size < 8 * 2**20
    card = (ADAPTER_DIR / "README.md").read_text()
    for fact in ("Data", "Training", "Reproduce", "seed", "Validation"):
        assert fact in card


def test_the_intervener_answers_a_grounded_decision():
    rows = read_rows([ADAPTER_DIR / "examples.jsonl"])
    supervisor = IntervenerSupervisor()
    for row in rows:
        observation = observation_of(row)
        decision = supervisor.decide(observation)
        assert decision.action in ACTIONS and not decision.fallback
        assert 0 < len(decision.explanation.split()) <= 30
        assert grounded(decision.explanation, supervisor.messages(observation)[-1][1]), decision.explanation


def test_template_explanations_keep_the_models_action_and_skip_its_words():
    """The default scores the action under the prompt the adapter was trained on, so it picks what the
    model writing its own explanation picks; the explanation is then the data's template."""
    rows = read_rows([ADAPTER_DIR / "examples.jsonl"])[:2]
    template, words = IntervenerSupervisor(), IntervenerSupervisor(explanations="model")
    assert template.messages(observation_of(rows[0])) == words.messages(observation_of(rows[0]))
    for row in rows:
        observation = observation_of(row)
        fast, slow = template.decide(observation), words.decide(observation)
        assert fast.action == slow.action and not fast.fallback
        assert json.loads(fast.raw_output) == {"action": fast.action, "explanation": ""}
        assert fast.explanation == explain(observation, fast.action)
        assert json.loads(slow.raw_output)["explanation"]  # the model's own words, generated


def test_through_serve_llm_the_intervener_sees_the_same_prompt_and_decides_the_same():
    """A served adapter gets the format instruction it was trained with from the client (the local
    model adds it itself), so the same observations give the same actions."""
    from selfsteer.agents.chat_models import make_chat_model
    from selfsteer.agents.local_llm import get_local_engine
    from selfsteer.agents.openai_server import create_app
    from selfsteer.trainer_bridge.testing import serving

    rows = read_rows([ADAPTER_DIR / "examples.jsonl"])
    local = IntervenerSupervisor()
    with serving(create_app(get_local_engine(adapter=ADAPTER_DIR))) as url:
        served = IntervenerSupervisor(chat_model=make_chat_model("openai:intervener", base_url=f"{url}/v1"))
        pairs = [(local.decide(observation_of(r)), served.decide(observation_of(r))) for r in rows]
    assert not any(d.fallback for pair in pairs for d in pair)
    assert [a.action for a, _ in pairs] == [b.action for _, b in pairs]
    assert len({a.action for a, _ in pairs}) > 1  # not one answer to everything
    assert [a.explanation for a, _ in pairs] == [b.explanation for _, b in pairs]


def test_train_with_supervisor_intervener(tmp_path):
    out, db = tmp_path / "run", tmp_path / "s.sqlite"
    selfsteer(
        "train", "--recipe", "tiny", "--set", "training.max_steps=200", "--set", "training.eval_steps=10",
        "--supervisor", "intervener", "--pause-while-deciding", "--max-iterations", "2",
        "--port", "0", "--out", str(out), "--db", str(db),
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["decisions"]) == 2
    with Store(db) as store:
        decisions = store.list_decisions(summary["run_id"])
    assert {d["model"] for d in decisions} == {"SmolLM2-135M-Instruct+intervener"}
    assert {d["strategy"] for d in decisions} == {"intervener@v1"}
    assert not any(d["fallback"] for d in decisions)
