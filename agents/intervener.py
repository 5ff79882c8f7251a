"""The intervener: the embedded SmolLM2-135M-Instruct with a LoRA adapter trained (TRL SFT, peft) on
the framework's own counterfactual decision data, answering the `intervener` prompt with the action and
a short explanation.

    supervisor = IntervenerSupervisor()                  # the adapter shipped in agents/intervener/
    train_intervener(IntervenerConfig(data=["runs/cf"], output_dir="runs/intervener"))

`selfsteer intervener train` runs the training; `--supervisor intervener` runs the result.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from langchain_core.messages import SystemMessage
from peft import LoraConfig
from pydantic import Field, create_model
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from selfsteer.agents.chat_models import make_chat_model
from selfsteer.agents.counterfactual_rows import CounterfactualRow, IntervenerExample
from selfsteer.agents.decision import LRDecision
from selfsteer.agents.intervener_data import (
    BASELINES,
    EVIDENCE,
    EVIDENCE_STEPS,
    STRATEGIES,
    STRATEGY,
    evidence_probe,
    examples,
    explain,
    grounded,
    label,
    noise_margin,
    observation_of,
    read_rows,
    regret,
)
from selfsteer.agents.llm.chat import LocalChatModel, _with_format_instruction, best_choice
from selfsteer.agents.llm.local_engines import forget_local_engine
from selfsteer.agents.llm.weights import load_embedded_model
from selfsteer.agents.supervisors import LLMSupervisor, decide_or_fall_back
from selfsteer.trainer_bridge.records import ACTIONS, strict_json

ADAPTER_DIR = Path(__file__).parent / "intervener"  # the shipped adapter (adapter_model.safetensors)
EXPLANATION_CHARS = 160
MAX_WORDS = 30  # the template explanations are under 120 characters; the grammar stops here


class IntervenerSupervisor(LLMSupervisor):
    """The embedded model with the intervener adapter merged in, prompted by the `intervener` strategy.

    explanations: "template" (the default): the model scores the three actions and the explanation is
        the training data's own template over the prompt's numbers (`explain`), which is grounded and
        says the right direction by construction, and keeps a decision under a second on 2 cores;
        "model": the model writes the explanation too (about 3.4 s), replaced by the template when it
        cites a number not in the prompt or runs past MAX_WORDS.
    chat_model: the model to ask (default: the embedded one with `adapter` merged; or a client of
        `selfsteer serve-llm --adapter`, which sees the same prompt).

    The prompt strategy is the one the adapter was trained on, read from its `metrics.json`.
    """

    name = "intervener"

    uses_chat_model = False  # its own model: the embedded one with the adapter

    @classmethod
    def from_options(cls, *, chat_model=None, strategy: str | None = None, option: str | None = None):
        """`intervener:DIR`: another adapter folder (default the shipped one)."""
        return cls(option or ADAPTER_DIR)

    def __init__(
        self,
        adapter: str | Path = ADAPTER_DIR,
        explanations: str = "template",
        chat_model=None,
    ):
        if explanations not in ("template", "model"):
            raise ValueError(f"explanations must be 'template' or 'model', not {explanations!r}")
        if chat_model is None:
            chat_model = make_chat_model("local", adapter=str(adapter), field_max_chars=EXPLANATION_CHARS)
        self.strategy_name = adapter_strategy(adapter)
        super().__init__(chat_model, self.strategy_name)
        self.explanations = explanations
        # The local model adds the format instruction the adapter was trained with to the prompt itself;
        # a served one (serve-llm --adapter, through ChatOpenAI) would not see it unless it is sent.
        self._send_format_instruction = not isinstance(chat_model, LocalChatModel)
        if explanations == "template":
            # The same schema, so the same format instruction the adapter was trained on, but an
            # explanation of at most 0 characters: the model answers the action and stops.
            described = LRDecision.model_fields["explanation"]
            self._schema = create_model(
                "LRDecision",
                __base__=LRDecision,
                explanation=(str, Field(default="", max_length=0, description=described.description)),
            )
            self._decide = chat_model.with_structured_output(self._schema, include_raw=True)

    def evidence(self, observation) -> dict | None:
        """An adapter trained on probed rows (strategy intervener_evidence) decides from the probe they
        carried: the same one is run before each decision. Others need none."""
        if self.strategy_name != EVIDENCE:
            return None
        left = observation.max_steps - observation.step if observation.max_steps else None
        interval = observation.eval_interval()
        return evidence_probe(max(EVIDENCE_STEPS if interval is None else interval, 1), left)

    def messages(self, observation) -> list[tuple[str, str]]:
        messages = super().messages(observation)
        if not self._send_format_instruction:
            return messages
        [system] = _with_format_instruction([SystemMessage(messages[0][1])], LRDecision.model_json_schema())
        return [("system", system.content), *messages[1:]]

    def decide(self, observation):
        """The model's action, explained by the template (or, with explanations="model", in its words
        when they are grounded and short; its own words stay in `raw_output` either way)."""
        decision = super().decide(observation)
        if decision.fallback:
            return decision
        if self.explanations == "template":
            decision.explanation = explain(observation, decision.action, self.strategy_name)
            return decision
        prompt = self.messages(observation)[-1][1]
        words = decision.explanation.split()
        if not grounded(decision.explanation, prompt) or len(words) > MAX_WORDS:
            decision.explanation = explain(observation, decision.action, self.strategy_name)
        return decision


def adapter_strategy(adapter: str | Path) -> str:
    """The prompt strategy an adapter was trained on (`strategy` in its metrics.json; adapters trained
    before the field existed used the table, `intervener`)."""
    metrics = Path(adapter) / "metrics.json"
    strategy = json.loads(metrics.read_text()).get("strategy", STRATEGY) if metrics.is_file() else STRATEGY
    if strategy not in STRATEGIES:
        raise ValueError(
            f"{metrics}: unknown intervener strategy {strategy!r} (known: {', '.join(STRATEGIES)})"
        )
    return strategy


@dataclass
class IntervenerConfig(SFTConfig):
    """TRL's `SFTConfig` with the intervener's defaults, plus what the data and the adapter need (each
    field's `help` says what it is; `selfsteer intervener train` takes every field as a flag).

    lora_alpha left at None becomes 2 * lora_r.
    """

    data: list[str] = field(
        default_factory=list,
        metadata={
            "help": "folders (or rows.jsonl files) written by `selfsteer decisions collect`",
            "metavar": "DIR",
        },
    )
    strategy: str = field(
        default=STRATEGY,
        metadata={
            "help": "the prompt the adapter learns to answer: intervener (a table of lr and losses per "
            "evaluation) or intervener_signals (the loss's recent moves in %%, its spread, the lr as multiples "
            "of its start: no absolute lr)",
            "choices": STRATEGIES,
        },
    )
    validation_seeds: list[int] = field(
        default_factory=lambda: [3],
        metadata={"help": "rows of runs with these seeds are held out of training and scored after it"},
    )
    validation_rows: int = field(
        default=300, metadata={"help": "at most this many validation rows are scored (a seeded sample)"}
    )
    max_examples: int = field(
        default=960,
        metadata={
            "help": "training examples, drawn equally from each label (a label with fewer rows is repeated); "
            "the training time grows with it (about 12 s per batch of 8 on 2 cores)"
        },
    )
    lora_r: int = field(
        default=8, metadata={"help": "rank of the LoRA adapter on every linear layer of the model"}
    )
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha; None: 2 * lora_r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    action_weight: float = field(
        default=30.0,
        metadata={"help": "how much the action's token weighs against one token of the explanation"},
    )
    calibration_rows: int = field(
        default=300,
        metadata={
            "help": "training rows (a seeded sample) whose mean answer sets the adapter's action bias after "
            "training (see `selfsteer intervener calibrate`); 0: no calibration"
        },
    )
    # SFTConfig's fields, with defaults for a 135M model on a CPU:
    output_dir: str = "runs/intervener"
    learning_rate: float = 1e-3
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8
    max_length: int | None = 512
    gradient_checkpointing: bool = False  # recomputation slows a CPU more than memory helps
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.05
    logging_steps: int = 5
    save_strategy: str = "no"
    report_to: str = "none"
    use_cpu: bool = True
    bf16: bool = False
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.data, str):  # one folder, as a YAML scalar
            self.data = [self.data]
        if isinstance(self.validation_seeds, int):
            self.validation_seeds = [self.validation_seeds]
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_r
        super().__post_init__()


ACTION_TOKEN = 4  # the action's first token in the answer: `{"`, `action`, `":`, ` "`, then the action


class CompletionHeadSFTTrainer(SFTTrainer):
    """TRL's SFT trainer, with two changes to the loss.

    - The language-model head is computed only over the positions that carry a label (the answer,
      about 40 of 280 tokens). SmolLM2's head has 49,152 outputs: over every position it costs a CPU
      more than the rest of the model (35 s a batch of 8 against 14 s measured here).
    - The action's token weighs `action_weight` times a token of the explanation. Unweighted, the
      explanation's ~35 tokens (templated, easy) swamp the one token that decides: the first adapter
      trained so reached a loss of 0.03 with the action at chance, and answered "double" 98% of the time.
    """

    def __init__(self, *args, action_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.action_weight = action_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        labelled = labels != -100
        first = int(torch.where(labelled.any(1), labelled.float().argmax(1), labels.shape[1]).min())
        keep = labels.shape[1] - first + 1  # logits at position p predict token p + 1
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            logits_to_keep=keep,
            use_cache=False,
        )
        logits, targets = outputs.logits[:, :-1], labels[:, labels.shape[1] - keep + 1 :]
        per_token = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="none",
        ).view(targets.shape)
        weights = label_weights(labels, self.action_weight)[:, labels.shape[1] - keep + 1 :]
        loss = (per_token * weights).sum() / weights.sum().clamp(min=1)
        return (loss, outputs) if return_outputs else loss


def label_weights(labels, action_weight: float):
    """Each position's weight in the loss, shaped like `labels`: 0 off the answer, 1 on it, and
    `action_weight` on the action's token (the answer's `ACTION_TOKEN`-th)."""

    mask = (labels != -100).float()
    weights = mask.clone()
    rows = torch.nonzero(mask.any(1)).flatten()
    action_at = mask.argmax(1)[rows] + ACTION_TOKEN
    inside = action_at < labels.shape[1]
    weights[rows[inside], action_at[inside]] *= action_weight
    return weights


def split(
    rows: list[CounterfactualRow], config: IntervenerConfig
) -> tuple[list[CounterfactualRow], list[CounterfactualRow]]:
    held = set(config.validation_seeds)
    return [r for r in rows if r.spec["seed"] not in held], [r for r in rows if r.spec["seed"] in held]


def balanced(data: list[IntervenerExample], total: int, seed: int) -> list[IntervenerExample]:
    """`total` examples, an equal share from each label: drawn without repetition until a label's rows
    run out, then again. Shuffled."""
    rng = random.Random(seed)
    by_label: dict[str, list[IntervenerExample]] = {}
    for example in data:
        by_label.setdefault(example.label, []).append(example)
    out = []
    for name in sorted(by_label):
        items, share = by_label[name], total // len(by_label)
        for start in range(0, share, len(items)):
            out += rng.sample(items, min(len(items), share - start))
    rng.shuffle(out)
    return out


def train_intervener(config: IntervenerConfig) -> dict:
    """Fine-tunes the embedded model's LoRA adapter on the labelled rows; saves the adapter, its card
    and `metrics.json` (validation figures) to `config.output_dir`. Returns the metrics."""

    if config.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {config.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    started = time.perf_counter()
    rows = read_rows(config.data)
    if not rows:
        raise ValueError(f"no collected rows in {config.data}")
    margin = noise_margin(rows)
    train_rows, validation_rows = split(rows, config)
    if len(validation_rows) > config.validation_rows:
        validation_rows = random.Random(config.seed).sample(validation_rows, config.validation_rows)
    train = balanced(examples(train_rows, margin, config.strategy), config.max_examples, config.seed)
    set_seed(config.seed)
    model, tokenizer = load_embedded_model()
    tokenizer.padding_side = "right"  # training pads on the right; the engine pads on the left
    dataset = Dataset.from_list([{"prompt": e.prompt, "completion": e.completion} for e in train])
    peft_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = CompletionHeadSFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        action_weight=config.action_weight,
    )
    result = trainer.train()
    output = Path(config.output_dir)
    trainer.model.save_pretrained(str(output))
    _half_precision(output / "adapter_model.safetensors")  # a few MB; merged back in float32 at load
    adapter_sha256 = hashlib.sha256((output / "adapter_model.safetensors").read_bytes()).hexdigest()
    train_s = time.perf_counter() - started
    del trainer, model

    metrics = {
        "rows": len(rows),
        "train_rows": len(train_rows),
        "train_examples": len(train),
        "train_labels": dict(Counter(e.label for e in train)),
        "validation_rows": len(validation_rows),
        "noise_margin": margin,
        "train_loss": result.training_loss,
        "train_steps": result.global_step,
        "train_s": train_s,
        "adapter_sha256": adapter_sha256,
        "seed": config.seed,
        "strategy": config.strategy,
        "data": [str(d) for d in config.data],
    }
    (output / "metrics.json").write_text(strict_json(metrics, indent=1))  # the strategy, for the supervisor
    if config.calibration_rows:
        metrics["choice_bias"] = calibrate(
            output, calibration_sample(train_rows, config.calibration_rows, config.seed)
        )
    metrics["validation"] = score_rows(validation_rows, margin, adapter=output, policies=BASELINES)
    (output / "metrics.json").write_text(strict_json(metrics, indent=1))
    (output / "README.md").write_text(model_card(config, metrics))
    return metrics


def calibration_sample(train_rows: list[CounterfactualRow], n: int, seed: int) -> list[CounterfactualRow]:
    """The training rows `calibrate` scores: a seeded draw of at most `n`, another than the validation
    sample's (which uses `seed`)."""
    return random.Random(seed + 1).sample(train_rows, min(n, len(train_rows)))


def calibrate(adapter: str | Path, rows: list[CounterfactualRow]) -> dict[str, float]:
    """Contextual calibration (Zhao et al., 2021): the adapter's mean probability of each action over
    `rows` (training rows: the prompts it learnt from), as a bias of -log(mean) on that action's
    log-probability, so that an action it answers often regardless of the prompt loses that head
    start. Underfit, the adapter leans on a prior (the shipped one gave "double" a mean probability of
    0.53 on the rows it was trained on, whose labels were drawn a third each). Written to the adapter's
    `calibration.json`, which the engine applies wherever the adapter answers (in process and through
    serve-llm); returns the bias."""

    path = Path(adapter) / "calibration.json"
    path.unlink(missing_ok=True)  # no stale bias survives a calibration that fails (scores are raw)
    supervisor = IntervenerSupervisor(adapter)
    totals = [0.0] * len(ACTIONS)

    for row in tqdm(rows, desc="calibrating", unit="row"):
        scores = _action_scores(supervisor, observation_of(row))
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        totals = [t + w / sum(weights) for t, w in zip(totals, weights, strict=True)]
    bias = {a: -math.log(t / len(rows)) for a, t in zip(ACTIONS, totals, strict=True)}
    path.write_text(strict_json({"choice_bias": {"action": bias}, "rows": len(rows)}, indent=1))
    forget_local_engine(adapter)  # the next load reads the new calibration
    return bias


def _half_precision(path: Path) -> None:
    tensors = load_file(str(path))
    save_file({k: v.to(torch.float16) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


# -----------------------------------------------------------------------------------------------------
# scoring on labelled rows


def score_rows(
    rows: list[CounterfactualRow],
    margin: float,
    adapter: str | Path | None = None,
    explain: int = 20,
    policies: tuple[str, ...] = ("keep", "rule"),
) -> dict:
    """The model's decisions on labelled rows against their labels and outcomes, beside `policies` that
    need no model (supervisors by name, each made afresh for every run's rows, deciding from the row's
    observation: `hypergradient` reads its update alignment, `probe:full` its probe table where the rows
    were collected with `--probe`): accuracy (with a 95% Wilson interval), mean regret of the chosen
    action, and for the first `explain` rows the full answer with its grounding."""
    from selfsteer.agents.registry import make_supervisor

    # the model writes its own explanations, for the card; its actions are the template mode's (tested)
    supervisor = IntervenerSupervisor(adapter, explanations="model") if adapter is not None else None
    data = examples(rows, margin, supervisor.strategy_name if supervisor else STRATEGY)
    chosen: dict[str, list[str]] = {name: [] for name in policies}
    if supervisor is not None:
        chosen["intervener"] = []
    answers, latencies, made = [], [], {}

    pairs = zip(rows, data, strict=True)
    for index, (row, example) in enumerate(tqdm(pairs, total=len(rows), desc="scoring", unit="row")):
        observation = observation_of(row)
        if made.get("run") != row.run:  # a supervisor remembers its run: a new one for each run
            made = {"run": row.run, **{name: make_supervisor(name) for name in policies if name != "keep"}}
        for name in policies:
            chosen[name].append(
                "keep" if name == "keep" else decide_or_fall_back(made[name], observation).action
            )
        if supervisor is None:
            continue
        if index < explain:
            decision = decide_or_fall_back(supervisor, observation)
            latencies.append(decision.latency_s)
            said = model_explanation(decision)
            answers.append(
                {
                    "label": example.label,
                    "action": decision.action,
                    "explanation": said,
                    "grounded": grounded(said, example.prompt[-1]["content"])
                    and len(said.split()) <= MAX_WORDS,
                }
            )
            chosen["intervener"].append(decision.action)
        else:
            chosen["intervener"].append(_action_only(supervisor, observation))
    labels = [label(r, margin) for r in rows]
    out = {}
    for name, actions in chosen.items():
        hits = sum(a == b for a, b in zip(actions, labels, strict=True))
        regrets = [regret(r, a) for r, a in zip(rows, actions, strict=True)]
        out[name] = {
            "accuracy": hits / len(rows) if rows else math.nan,
            "accuracy_ci95": wilson(hits, len(rows)),
            "mean_regret": statistics.fmean(min(x, 1.0) for x in regrets) if regrets else math.nan,
            "actions": dict(Counter(actions)),
        }
    out["labels"] = dict(Counter(labels))
    if answers:
        out["answers"] = answers
        out["grounded"] = sum(a["grounded"] for a in answers) / len(answers)
        out["median_latency_s"] = statistics.median(latencies)
    return out


def model_explanation(decision) -> str:
    """The explanation as the model wrote it (before any grounding replacement)."""
    try:
        return json.loads(decision.raw_output or "")["explanation"]
    except (ValueError, KeyError, TypeError):
        return decision.explanation


def _action_prefix(supervisor: IntervenerSupervisor, observation) -> str:
    """The text the structured answer's action follows: the prompt as the local model sends it."""

    chat = supervisor.chat_model
    messages = _with_format_instruction(
        chat._convert_input(supervisor.messages(observation)).to_messages(),
        LRDecision.model_json_schema(),
    )
    return chat.engine.tokenizer.decode(chat._prompt_ids(messages), skip_special_tokens=False) + '{"action":'


def _action_scores(supervisor: IntervenerSupervisor, observation) -> list[float]:
    """The log-probability of each action (ACTIONS' order), uncalibrated."""
    options = [f' "{a}"' for a in ACTIONS]
    return supervisor.chat_model.engine.score_options(_action_prefix(supervisor, observation), options)


def _action_only(supervisor: IntervenerSupervisor, observation) -> str:
    """The action the supervisor's structured output takes (the three scored, the calibration added)."""

    chat = supervisor.chat_model
    return best_choice(chat.engine, _action_prefix(supervisor, observation), "action", list(ACTIONS))


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _calibration_text(metrics: dict) -> str:
    bias = metrics.get("choice_bias")
    if not bias:
        return "none (calibration_rows 0)."
    means = ", ".join(f"{a} {math.exp(-b):.3f}" for a, b in bias.items())
    return (
        f"the adapter's mean action probabilities on sampled training rows were {means}; each action's "
        "log-probability gets -log(its mean) added wherever the adapter answers. The validation figures "
        "below include it."
    )


def score_row(name: str, score: dict) -> str:
    """One policy's scores (`score_rows`) as a markdown table row: accuracy [95% CI] | mean regret | actions."""
    low, high = score["accuracy_ci95"]
    return f"| {name} | {score['accuracy']:.3f} [{low:.3f}, {high:.3f}] | {score['mean_regret']:.4f} | {score['actions']} |"


def model_card(config: IntervenerConfig, metrics: dict) -> str:
    validation = metrics["validation"]
    answers = "\n".join(
        f'- label {a["label"]}, answered {a["action"]}: "{a["explanation"]}" (grounded: {a["grounded"]})'
        for a in validation.get("answers", [])[:3]
    )
    return f"""---
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
library_name: peft
tags: [selfsteer, lora, trl, sft, learning-rate]
---
# selfsteer intervener (LoRA adapter)

The embedded SmolLM2-135M-Instruct with this adapter merged in decides, after each evaluation of a
training run, whether to double, halve or keep the learning rate, with a one-sentence explanation that
cites the prompt's numbers (prompt strategy `{config.strategy}`). `--supervisor intervener` runs it.

- **Data**: {metrics["rows"]} counterfactual decision points from `selfsteer decisions collect`
  ({", ".join(metrics["data"])}); labels: the best action at the horizon, keep unless another beats it by
  the noise margin {metrics["noise_margin"]:.2%}. Trained on {metrics["train_rows"]} rows (seeds other
  than {config.validation_seeds}), drawn equally per label: {metrics["train_examples"]} examples {metrics["train_labels"]}.
- **Training**: TRL SFT (completion-only loss), LoRA r={config.lora_r}, alpha={config.lora_alpha} on every
  linear layer, lr {config.learning_rate}, {config.num_train_epochs} epoch(s), batch
  {config.per_device_train_batch_size}, seed {config.seed}: {metrics["train_steps"]} steps,
  {metrics["train_s"] / 60:.1f} min on this machine's CPU, final train loss {metrics["train_loss"]:.4f}.
  Weights stored in float16: `adapter_model.safetensors`, sha256
  {metrics["adapter_sha256"]}.
- **Calibration** (`calibration.json`): {_calibration_text(metrics)}
- **Reproduce**: `selfsteer intervener train --data {" ".join(metrics["data"])} --strategy {config.strategy} --max_examples {config.max_examples} --seed {config.seed} --output_dir {config.output_dir}`

## Validation (rows of held-out seeds {config.validation_seeds}: {metrics["validation_rows"]} decision points)

Accuracy against the label (95% Wilson interval); regret: the chosen action's eval loss at the horizon
relative to the best action's (capped at 1), averaged.

| policy | accuracy | mean regret | actions |
| --- | --- | --- | --- |
{chr(10).join(score_row(name, validation[name]) for name in ("intervener", *BASELINES))}

Labels: {validation["labels"]}. The model's own explanations grounded (every number in the prompt, at
most {MAX_WORDS} words; others are replaced by the factual template at decision time):
{validation.get("grounded", math.nan):.0%} of {len(validation.get("answers", []))}; median latency of a decision
with the model's own explanation {validation.get("median_latency_s", math.nan):.2f} s (by default the model scores the
action and a template explains it, under a second). First answers, verbatim:

{answers}

The lr-suite's held-out cells (a model shape, an optimizer and start lrs never collected) are
the real test: see the project README and the lr-suite report.
"""
