"""GRPO on reflections, through TRL's own trainer and loss (CPU, fp32, no mocks of TRL):
- a real GRPO step on the embedded SmolLM2-135M whose reward is pass/fail alone (the task's validator on
  the retry): a group where one reflection's retry passes and the other's fails has non-zero advantages,
  and the step moves the weights; a group where both fail does not (on a tiny random model);
- the loss mask covers the reflection tokens only, and `check_reflection_mask` refuses exactly the masks
  under which some other token would get gradient, or some reflection token none: shown with the
  gradient of TRL's loss with respect to each completion token's log-probability.

The retries are scripted (one passes, one fails): the untrained model fails every Countdown retry, so its
own retries would give every reflection reward 0 and the group no gradient at all. The policy's own
retry is still generated for every reflection, and the retry conversations are checked."""

from __future__ import annotations

import pytest
import torch

from selfsteer.evals.tasks import countdown
from selfsteer.graphs.reflect import load_prompts, reflect_messages, reflection_reward

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_torch_thread")]

PROBLEM = countdown.make_problem([3, 5, 2], 16)
FAILED, SOLUTION = "3 + 5 + 2", "(3 + 5) * 2"


@pytest.fixture(scope="module")
def model_dir():
    from selfsteer.agents.llm.weights import cache_dir, is_cached, load_embedded_model

    if not is_cached():
        load_embedded_model()
    return str(cache_dir())


@pytest.fixture(scope="module")
def tiny_model_dir(model_dir, tmp_path_factory):
    """A randomly initialised one-layer Llama with the embedded model's tokenizer and chat template: for
    tests of the mechanism, not of the model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # a one-layer Llama's sizes # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def rows():
    return [
        {"prompt": reflect_messages(PROBLEM, [FAILED]), "problem_id": PROBLEM.id, "failed_attempt": FAILED}
    ]


def pass_fail_reward(steps: list[list[bool]], seen: dict):
    """The real reward (`reflection_reward`: 1 when the retry passes the validator, else 0) with retries
    scripted per step and position in the group: steps[k][i] says whether reflection i's retry is the
    solution in the k-th reward call (one per optimizer step)."""
    real_reward = reflection_reward([PROBLEM])

    def reward(reflections, columns, generate):
        outcomes = steps[len(seen.setdefault("rewards_per_step", []))]

        def retries(conversations):
            seen["conversations"] = conversations
            seen["policy_retries"] = generate(conversations)  # the policy's own retries, generated too
            return [SOLUTION if passes else FAILED for passes in outcomes]

        rewards = real_reward(reflections, columns, retries)
        seen["reflections"], seen["rewards"] = list(reflections), list(rewards)
        seen["rewards_per_step"].append(list(rewards))
        return rewards

    return reward


def train_steps(model: str, tmp_path, steps: list[list[bool]], engine_factory=None, **overrides):
    """Train one optimizer step per entry of `steps` (each one group's scripted retry outcomes; no refill
    of groups without signal unless `refill_attempts` is given)."""
    from selfsteer.graphs.grpo_reflection import ReflectionGRPOConfig, build_trainer

    options = {
        "model": model, "output_dir": str(tmp_path / "grpo"), "num_generations": len(steps[0]),
        "max_steps": len(steps), "max_completion_length": 16, "max_retry_tokens": 8, "learning_rate": 1e-4,
        "save_steps": 1000, "use_cpu": True, "refill_attempts": 0,
    }  # the GRPO options of every run here # fmt: skip
    config = ReflectionGRPOConfig(**{**options, **overrides})
    seen: dict = {}
    trainer = build_trainer(config, rows(), pass_fail_reward(steps, seen), engine_factory=engine_factory)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    return trainer, seen, changed


def one_step(model: str, tmp_path, outcomes: list[bool], engine_factory=None, **overrides):
    return train_steps(model, tmp_path, [outcomes], engine_factory, **overrides)


def test_a_pass_fail_reward_alone_moves_the_weights(model_dir, tmp_path):
    trainer, seen, changed = one_step(model_dir, tmp_path, [True, False])

    assert seen["rewards"] == [1.0, 0.0]  # pass/fail and nothing else
    advantages = trainer.last_batch["advantages"]
    assert advantages[0] > 0 > advantages[1], advantages
    assert changed, "a group with one pass and one fail must move the weights"

    # The retry of each reflection has that reflection in context, and the policy answered each one.
    assert len(seen["conversations"]) == 2 and len(seen["policy_retries"]) == 2
    for conversation, reflection in zip(seen["conversations"], seen["reflections"], strict=True):
        assert reflection.strip() in "\n".join(m["content"] for m in conversation)

    batch = trainer.last_batch
    tokenizer = trainer.processing_class
    prompt = tokenizer.decode(batch["prompt_ids"][0][batch["prompt_mask"][0].bool()])
    # The prompt is task + failed attempt + the reflect instruction, in that order, then the assistant turn.
    instruction = load_prompts()["reflect"].strip()
    assert PROBLEM.prompt in prompt and FAILED in prompt and instruction in prompt
    assert prompt.index(PROBLEM.prompt) < prompt.rindex(FAILED) < prompt.rindex(instruction)

    # What the loss mask keeps decodes to the very reflections the reward function scored.
    mask = batch["completion_mask"].bool()
    for row in range(mask.shape[0]):
        kept = tokenizer.decode(batch["completion_ids"][row][mask[row]], skip_special_tokens=True)
        assert kept.strip() == seen["reflections"][row].strip()


def test_a_group_that_all_fails_leaves_the_weights_alone(tiny_model_dir, tmp_path):
    """The contrast on a tiny model: the same step with both retries failing has zero advantages and
    changes nothing; with one pass it changes the weights. The zero-advantage pass is skipped, and
    without the skip TRL's own loss gives the very same (unchanged) weights."""
    trainer, seen, changed = one_step(tiny_model_dir, tmp_path / "fail", [False, False])
    assert seen["rewards"] == [0.0, 0.0]
    assert not trainer.last_batch["advantages"].any() and changed == []
    assert trainer.skipped_batches == 1
    trainer, seen, changed = one_step(
        tiny_model_dir, tmp_path / "full", [False, False], skip_zero_advantage=False
    )
    assert changed == [] and trainer.skipped_batches == 0
    trainer, seen, changed = one_step(tiny_model_dir, tmp_path / "mixed", [False, True])
    assert seen["rewards"] == [0.0, 1.0] and changed and trainer.skipped_batches == 0


def test_a_group_without_signal_is_dropped_and_refilled(tiny_model_dir, tmp_path):
    """DAPO's dynamic sampling: a group whose reflections all earned the same reward is replaced by
    another failed attempt's group before the step, so the step trains on one with signal; when every
    refill lacks signal too, the step is the zero-advantage one (skipped, weights unchanged)."""
    trainer, seen, changed = train_steps(
        tiny_model_dir, tmp_path / "refilled", [[False, False], [False, True]], max_steps=1, refill_attempts=2
    )
    assert seen["rewards_per_step"] == [[0.0, 0.0], [0.0, 1.0]]
    assert trainer.refilled_batches == 1 and trainer.skipped_batches == 0 and changed
    trainer, seen, changed = train_steps(
        tiny_model_dir, tmp_path / "dry", [[False, False], [True, True]], max_steps=1, refill_attempts=1
    )
    assert seen["rewards_per_step"] == [[0.0, 0.0], [1.0, 1.0]]
    assert trainer.refilled_batches == 1 and trainer.skipped_batches == 1 and changed == []


def test_a_skipped_step_leaves_the_optimizer_where_trls_zero_loss_does(tiny_model_dir, tmp_path):
    """The skip is a pure speed-up past the first step too: a zero-advantage step, then a mixed one,
    end with the same weights and the same AdamW state (step counts, moments) with the skip as with
    TRL's own zero loss. Weight decay makes the zero-gradient step itself move the weights."""
    trainers = {}
    for skip in (True, False):
        trainer, seen, _ = train_steps(
            tiny_model_dir,
            tmp_path / f"skip-{skip}",
            [[False, False], [False, True]],
            skip_zero_advantage=skip,
            weight_decay=0.1,
        )
        assert seen["rewards_per_step"] == [[0.0, 0.0], [0.0, 1.0]]
        trainers[skip] = trainer
    skipped, full = trainers[True], trainers[False]
    assert skipped.skipped_batches == 1 and full.skipped_batches == 0
    # The second step's gradient is only comparable if both runs sampled the same reflections.
    assert torch.equal(skipped.last_batch["completion_ids"], full.last_batch["completion_ids"])

    tight = {"rtol": 1e-6, "atol": 1e-9}
    for (name, weight), (_, reference) in zip(
        skipped.model.named_parameters(), full.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(weight, reference, **tight, msg=lambda m, name=name: f"{name}: {m}")
    state, reference_state = skipped.optimizer.state_dict()["state"], full.optimizer.state_dict()["state"]
    assert state.keys() == reference_state.keys()
    for index, entry in reference_state.items():
        assert state[index].keys() == entry.keys()
        for key, value in entry.items():
            torch.testing.assert_close(
                state[index][key], value, **tight, msg=lambda m, at=(index, key): f"state {at}: {m}"
            )


def test_engine_rollouts_decode_reflections_and_retries_with_the_model_being_trained(
    tiny_model_dir, tmp_path
):
    """Reflections (TRL's rollout_func) and the policy's retries both go through the batched engine,
    built around the trainer's own model object; the completions end with the end token TRL looks for,
    so the mask check holds, and a mixed group moves the weights."""
    from selfsteer.agents.llm.engine import LocalEngine

    engines = []

    def factory(model, tokenizer):
        engines.append(LocalEngine(model, tokenizer))
        return engines[-1]

    trainer, seen, changed = one_step(tiny_model_dir, tmp_path, [True, False], engine_factory=factory)
    assert len(engines) == 1 and engines[0].model is trainer.accelerator.unwrap_model(trainer.model)
    assert engines[0].stats["requests"] == 4  # two reflections, then their two retries
    assert len(seen["policy_retries"]) == 2 and seen["rewards"] == [1.0, 0.0]
    batch = trainer.last_batch
    eos = trainer.eos_token_ids
    for row, ids in enumerate(batch["completion_ids"].tolist()):
        kept = [t for t, m in zip(ids, batch["completion_mask"][row].tolist(), strict=True) if m]
        assert kept[-1] in eos or len(kept) == 16  # ended with its end token, or cut at the limit
    assert changed
    assert not engines[0]._worker.is_alive()  # closed when training ended


def test_lora_trains_an_adapter_and_saves_a_plain_merged_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from selfsteer.graphs.grpo_reflection import ReflectionGRPOConfig, train

    config = ReflectionGRPOConfig(
        model=tiny_model_dir, output_dir=str(tmp_path / "lora"), num_generations=2, max_steps=1,
        max_completion_length=8, max_retry_tokens=4, learning_rate=1e-2, save_steps=1000, use_cpu=True, lora_r=4,
    )  # a one-step LoRA config # fmt: skip
    outcomes = iter([1.0, 0.0])
    result = train(
        config, rows(), lambda reflections, columns, generate: [next(outcomes) for _ in reflections]
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged = AutoModelForCausalLM.from_pretrained(result["final_model"])
    assert set(merged.state_dict()) == set(base.state_dict())  # no lora_A/lora_B left: a plain model
    moved = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert moved and all("proj" in k for k in moved)  # only the adapted linear layers changed


# -----------------------------------------------------------------------------
# the reflection mask, against the gradient


def token_gradients(trainer, batch: dict) -> torch.Tensor:
    """d(TRL's GRPO loss) / d(log-prob of each completion token): non-zero exactly where a token gets
    gradient under this batch's masks."""
    captured = {}
    compute = trainer._get_per_token_logps_and_entropies

    def capture(*args, **kwargs):
        logps, *rest = compute(*args, **kwargs)
        logps.retain_grad()
        captured["logps"] = logps
        return (logps, *rest)

    trainer._get_per_token_logps_and_entropies = capture
    try:
        trainer.model.eval()  # the loss normalises by num_items_in_batch, with no accumulation state
        trainer.compute_loss(trainer.model, batch).backward()
    finally:
        del trainer._get_per_token_logps_and_entropies
        trainer.model.zero_grad()
    return captured["logps"].grad


@pytest.fixture(scope="module")
def mask_trainer(tiny_model_dir, tmp_path_factory):
    from selfsteer.graphs.grpo_reflection import ReflectionGRPOConfig, build_trainer

    config = ReflectionGRPOConfig(
        model=tiny_model_dir,
        output_dir=str(tmp_path_factory.mktemp("mask")),
        num_generations=2,
        max_steps=1,
        use_cpu=True,
    )
    return build_trainer(config, rows(), lambda reflections, columns, generate: [0.0] * len(reflections))


def reflection_batch(trainer) -> dict:
    """Two reflections after the real prompt: a short one that ends early (then padding) and a long one."""
    tokenizer = trainer.processing_class
    prompt = tokenizer.apply_chat_template(rows()[0]["prompt"], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    eos, pad = trainer.eos_token_ids[0], tokenizer.pad_token_id
    short = tokenizer("Multiply.", add_special_tokens=False)["input_ids"] + [eos]
    long = tokenizer("Add 3 and 5 first, then multiply by 2.", add_special_tokens=False)["input_ids"] + [eos]
    width = len(long) + 2
    completion_ids = torch.tensor([short + [pad] * (width - len(short)), long + [pad] * (width - len(long))])
    reflection = torch.tensor([[1] * len(short) + [0] * (width - len(short)), [1] * len(long) + [0, 0]])
    return {
        "prompt_ids": prompt_ids.repeat(2, 1),
        "prompt_mask": torch.ones(2, prompt_ids.shape[1], dtype=torch.long),
        "completion_ids": completion_ids,
        "reflection": reflection,  # the truth, written out by hand
        "advantages": torch.tensor([1.0, -1.0]),
    }


def leak_past_the_end(mask):
    mask[0, int(mask[0].sum())] = 1  # the padding token right after the short reflection's end
    return mask


def hole(mask):
    mask[1, 2] = 0  # a token inside the long reflection
    return mask


def all_zero(mask):
    return mask * 0


def one_row_zero(mask):
    mask[1] = 0
    return mask


def whole_row(mask):
    return torch.ones_like(mask)  # the padding of both rows too


@pytest.mark.parametrize(
    ("corrupt", "refusal"),
    [
        (None, None),
        (leak_past_the_end, "would get gradient"),
        (whole_row, "would get gradient"),
        (hole, "not fully in the loss mask"),
        (one_row_zero, "row 1: the loss mask is all zero"),
        (all_zero, "the loss mask is all zero"),
    ],
)
def test_the_mask_check_refuses_what_the_gradient_shows(mask_trainer, corrupt, refusal):
    from selfsteer.graphs.grpo_reflection import check_reflection_mask, reflection_spans

    batch = reflection_batch(mask_trainer)
    eos = mask_trainer.eos_token_ids
    assert torch.equal(reflection_spans(batch["completion_ids"], eos), batch["reflection"])
    mask = batch["reflection"].clone()
    batch["completion_mask"] = corrupt(mask) if corrupt else mask
    batch["num_items_in_batch"] = batch["completion_mask"].sum()

    gets_gradient = token_gradients(mask_trainer, batch) != 0
    exactly_the_reflection = torch.equal(gets_gradient, batch["reflection"].bool())
    # TRL's loss trains exactly the masked-in tokens: the mask is what decides.
    assert torch.equal(gets_gradient, batch["completion_mask"].bool())
    if refusal is None:
        assert exactly_the_reflection
        check_reflection_mask(batch, eos)
    else:
        assert not exactly_the_reflection
        with pytest.raises(AssertionError, match=refusal):
            check_reflection_mask(batch, eos)


def test_the_mask_check_reads_tool_mask_and_truncated_rows(mask_trainer):
    from selfsteer.graphs.grpo_reflection import check_reflection_mask

    batch = reflection_batch(mask_trainer)
    eos = mask_trainer.eos_token_ids
    batch["completion_mask"] = batch["reflection"].clone()
    batch["tool_mask"] = torch.ones_like(batch["reflection"])
    batch["tool_mask"][1, 0] = 0  # TRL multiplies it in: the first token of row 1 gets no gradient
    with pytest.raises(AssertionError, match=r"row 1: reflection positions \[0\]"):
        check_reflection_mask(batch, eos)

    # A reflection that never ends (cut at the length limit) is the whole row.
    cut = batch["completion_ids"][1, :6].reshape(2, 3)  # no end token in the first 6 of the long one
    assert not torch.isin(cut, torch.tensor(eos)).any()
    truncated = {"completion_ids": cut, "completion_mask": torch.ones(2, 3)}
    check_reflection_mask(truncated, eos)
    truncated["completion_mask"] = torch.tensor([[1, 1, 0], [1, 1, 1]])
    with pytest.raises(AssertionError, match=r"row 0: reflection positions \[2\]"):
        check_reflection_mask(truncated, eos)
    # Under TRL's mask_truncated_completions such a row is all zero on purpose, but not the whole batch.
    truncated["completion_mask"] = torch.tensor([[0, 0, 0], [1, 1, 1]])
    check_reflection_mask(truncated, eos, truncated_masked=True)
    with pytest.raises(AssertionError, match="row 0: the loss mask is all zero"):
        check_reflection_mask(truncated, eos)
    truncated["completion_mask"] = torch.zeros(2, 3)
    with pytest.raises(AssertionError, match="the loss mask is all zero"):
        check_reflection_mask(truncated, eos, truncated_masked=True)


def test_the_config_is_trls_with_this_projects_defaults(tmp_path):
    from trl import GRPOConfig

    from selfsteer.graphs.grpo_reflection import ReflectionGRPOConfig, last_checkpoint

    config = ReflectionGRPOConfig(model="m", output_dir=str(tmp_path), num_generations=4, prompts_per_step=2,
                                  beta=0.04, max_completion_length=48, use_cpu=True)  # a two-prompt config # fmt: skip
    assert isinstance(config, GRPOConfig)
    assert config.use_cpu and not config.bf16 and not config.use_vllm
    assert (config.num_generations, config.per_device_train_batch_size, config.beta) == (4, 8, 0.04)
    assert config.max_completion_length == 48 and not config.remove_unused_columns
    # the defaults every run had before the config became a GRPOConfig (TRL's own, or overridden here)
    default = ReflectionGRPOConfig(use_cpu=True)
    assert {k: getattr(default, k) for k in (
        "output_dir", "num_generations", "per_device_train_batch_size", "beta", "learning_rate", "max_steps",
        "max_completion_length", "max_retry_tokens", "temperature", "top_p", "save_steps", "save_total_limit",
        "logging_steps", "seed", "lora_r", "skip_zero_advantage", "bf16", "use_vllm", "remove_unused_columns",
        "gradient_checkpointing", "report_to",
    )} == {
        "output_dir": "runs/reflect-grpo", "num_generations": 4, "per_device_train_batch_size": 4, "beta": 0.0,
        "learning_rate": 1e-6, "max_steps": 50, "max_completion_length": 64, "max_retry_tokens": 64,
        "temperature": 1.0, "top_p": 1.0, "save_steps": 10, "save_total_limit": 2, "logging_steps": 1,
        "seed": 0, "lora_r": 0, "skip_zero_advantage": True, "bf16": False, "use_vllm": False,
        "remove_unused_columns": False, "gradient_checkpointing": False, "report_to": [],
    }  # keys and their defaults, in the same order # fmt: skip
    assert default.save_strategy == "steps" and default.vllm_mode == "colocate"
    assert ReflectionGRPOConfig(per_device_train_batch_size=8).per_device_train_batch_size == 8  # given: kept
    with pytest.raises(ValueError, match="num_generations"):
        ReflectionGRPOConfig(num_generations=1, use_cpu=True)
    assert last_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-12").mkdir()
    assert last_checkpoint(tmp_path).endswith("checkpoint-12")
