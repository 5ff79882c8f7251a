"""The intervener: TRL SFT of a LoRA adapter on collected counterfactual rows (a real, short training),
the shipped adapter and its card, and `--supervisor intervener` steering a real run."""

import hashlib
import json
import math
import shutil
from collections import Counter
from types import SimpleNamespace

import pytest
from helpers.cli import selfsteer_here
from safetensors.torch import load_file

from selfsteer.agents.intervener import (
    ADAPTER_DIR,
    CompletionHeadSFTTrainer,
    IntervenerConfig,
    IntervenerSupervisor,
    label_weights,
    wilson,
)
from selfsteer.agents.intervener_data import (
    examples,
    explain,
    grounded,
    label,
    noise_margin,
    observation_of,
    read_rows,
)
from selfsteer.agents.supervisors import ACTIONS, RuleSupervisor
from selfsteer.evals.collect import CollectConfig, collect
from selfsteer.evals.counterfactual import RunSpec
from selfsteer.trainer_bridge.store import Store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_intervener_train_fits_an_adapter_and_scores_it(tmp_path, capsys):
    data = tmp_path / "cf"
    specs = [
        RunSpec(shape="tiny", lr=lr, seed=seed, max_steps=30) for seed in (0, 3) for lr in (1.5625e-4, 0.64)
    ]
    collect(CollectConfig(out=str(data), specs=specs), progress=False)
    out = tmp_path / "adapter"
    # In this process (the CLI's own entry point): a fresh interpreter would spend ~10 s importing torch
    # and transformers again. One example per label: one optimizer step.
    from selfsteer.cli.main import main

    argv = ["intervener", "train", "--data", str(data), "--output_dir", str(out), "--max_examples", "3"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 1 and metrics["train_examples"] <= 3
    assert metrics["validation_rows"] == 4  # the seed-3 runs: two decision points each
    # Each policy's accuracy, recounted from the collected rows: the labels, the rule supervisor's own
    # answers, and the intervener's answers (all four rows are among the explained ones).
    rows = read_rows([data])
    margin = noise_margin(rows)
    held = [r for r in rows if r.spec["seed"] == 3]
    labels = [label(r, margin) for r in held]
    validation = metrics["validation"]
    assert metrics["noise_margin"] == margin and validation["labels"] == dict(Counter(labels))
    answers = validation["answers"]
    assert [a["label"] for a in answers] == labels
    chosen = {
        "keep": ["keep"] * len(held),
        "rule": [RuleSupervisor().decide(observation_of(r)).action for r in held],
        "intervener": [a["action"] for a in answers],
    }
    for policy, actions in chosen.items():
        hits = sum(a == b for a, b in zip(actions, labels, strict=True))
        assert validation[policy]["accuracy"] == hits / 4, policy
        assert validation[policy]["accuracy_ci95"] == list(wilson(hits, 4)), policy
        assert validation[policy]["actions"] == dict(Counter(actions)), policy
    assert '"intervener"' in said
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all(str(t.dtype) == "torch.float16" for t in weights.values())
    card = (out / "README.md").read_text()
    assert "selfsteer intervener train" in card and "Validation" in card
    bias = json.loads((out / "calibration.json").read_text())["choice_bias"]["action"]
    assert set(bias) == set(ACTIONS) and bias == metrics["choice_bias"]
    # -log(mean probability) over the scored rows: the three mean probabilities sum to one
    assert sum(math.exp(-b) for b in bias.values()) == pytest.approx(1.0)


def test_the_action_token_alone_weighs_action_weight_in_the_loss(tmp_path):
    """The batch TRL builds from one example per action: the one position weighted 30x is the action's
    first token, right after `{"action": "`, and the trainer's loss applies exactly those weights."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from selfsteer.agents.llm.weights import load_embedded_model

    margin = json.loads((ADAPTER_DIR / "metrics.json").read_text())["noise_margin"]
    one_each = {}
    for example in examples(read_rows([ADAPTER_DIR / "examples.jsonl"]), margin):
        one_each.setdefault(example.label, example)
    assert set(one_each) == set(ACTIONS)
    model, tokenizer = load_embedded_model()
    tokenizer.padding_side = "right"  # as train_intervener pads
    dataset = Dataset.from_list([{"prompt": e.prompt, "completion": e.completion} for e in one_each.values()])
    config = IntervenerConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(one_each))
    trainer = CompletionHeadSFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        action_weight=30.0,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    labels, ids = batch["labels"], batch["input_ids"]
    weights = label_weights(labels, 30.0)
    seen = set()
    for row in range(len(labels)):
        answer = torch.nonzero(labels[row] != -100).flatten()
        heavy = torch.nonzero(weights[row] == 30.0).flatten().tolist()
        assert len(heavy) == 1
        at = heavy[0]
        action = json.loads(tokenizer.decode(ids[row, answer]).split("<|im_end|>")[0])["action"]
        seen.add(action)
        assert tokenizer.decode(ids[row, answer[0] : at]) == '{"action": "'
        token = tokenizer.decode(ids[row, at])
        assert token and action.startswith(token), (token, action)  # "halve" is two tokens: "hal", "ve"
        assert tokenizer.decode(ids[row, at:]).startswith(action + '"')
        others = [p for p in answer.tolist() if p != at]
        assert weights[row, others].eq(1.0).all() and weights[row][labels[row] == -100].eq(0.0).all()
    assert seen == set(ACTIONS)

    # compute_loss weighs each position's cross-entropy by exactly these weights
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(*ids.shape, model.config.vocab_size, generator=generator)

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, logits_to_keep=0, use_cache=False):
            return SimpleNamespace(logits=logits[:, -logits_to_keep:])

    loss = CompletionHeadSFTTrainer.compute_loss(trainer, Fixed(), batch)
    # logits at position p predict the token at p + 1
    picked = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1))
    expected = (-picked.squeeze(-1) * weights[:, 1:]).sum() / weights[:, 1:].sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_calibration_bias_moves_the_answer_in_process_and_served(tmp_path):
    """The engine adds an adapter's choice bias wherever a structured answer picks an action."""
    from helpers.live_run import serving

    from selfsteer.agents.chat_models import make_chat_model
    from selfsteer.agents.llm.local_engines import get_local_engine
    from selfsteer.agents.llm.openai_server import create_app

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
    weights = (ADAPTER_DIR / "adapter_model.safetensors").read_bytes()
    assert len(weights) < 8 * 2**20
    card = (ADAPTER_DIR / "README.md").read_text()
    for fact in ("Data", "Training", "Reproduce", "seed", "Validation"):
        assert fact in card
    # The card describes these very weights: the file's hash is the one metrics.json and the card record.
    metrics = json.loads((ADAPTER_DIR / "metrics.json").read_text())
    assert hashlib.sha256(weights).hexdigest() == metrics["adapter_sha256"]
    # Every figure the card quotes from metrics.json, spelled as the card spells it (model_card's formats).
    m, v = metrics, metrics["validation"]
    means = ", ".join(f"{a} {math.exp(-b):.3f}" for a, b in m["choice_bias"].items())
    quoted = [
        f"prompt strategy `{m['strategy']}`",
        f"sha256\n  {m['adapter_sha256']}.",
        f"- **Data**: {m['rows']} counterfactual decision points",
        f"({', '.join(m['data'])}); labels:",
        f"the noise margin {m['noise_margin']:.2%}. Trained on {m['train_rows']} rows",
        f"drawn equally per label: {m['train_examples']} examples {m['train_labels']}.",
        f"seed {m['seed']}: {m['train_steps']} steps,",
        f"{m['train_s'] / 60:.1f} min on this machine's CPU, final train loss {m['train_loss']:.4f}.",
        f"on sampled training rows were {means};",
        f": {m['validation_rows']} decision points)",
        f"Labels: {v['labels']}.",
        f"{v['grounded']:.0%} of {len(v['answers'])};",
        f"with the model's own explanation {v['median_latency_s']:.2f} s",
    ]
    for policy in ("intervener", "keep", "rule"):
        p = v[policy]
        low, high = p["accuracy_ci95"]
        quoted.append(
            f"| {policy} | {p['accuracy']:.3f} [{low:.3f}, {high:.3f}] | {p['mean_regret']:.4f} | {p['actions']} |"
        )
    for a in v["answers"][:3]:
        quoted.append(
            f'- label {a["label"]}, answered {a["action"]}: "{a["explanation"]}" (grounded: {a["grounded"]})'
        )
    for figure in quoted:
        assert figure in card, figure


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
    from helpers.live_run import serving

    from selfsteer.agents.chat_models import make_chat_model
    from selfsteer.agents.llm.local_engines import get_local_engine
    from selfsteer.agents.llm.openai_server import create_app

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
    selfsteer_here(
        "train", "--recipe", "tiny", "--set", "training.max_steps=200", "--set", "training.eval_steps=10",
        "--supervisor", "intervener", "--pause-while-deciding", "--max-iterations", "2",
        "--port", "0", "--out", str(out), "--db", str(db),
    )  # the train command as a user types it # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["decisions"]) == 2
    with Store(db) as store:
        decisions = store.list_decisions(summary["run_id"])
    assert {d["model"] for d in decisions} == {"SmolLM2-135M-Instruct+intervener"}
    assert {d["strategy"] for d in decisions} == {"intervener@v1"}
    assert not any(d["fallback"] for d in decisions)
