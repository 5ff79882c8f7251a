"""Training recipes: YAML files with four sections.

    model:      the architecture (`type: gpt2` plus any GPT2Config field), trained from scratch
    data:       the corpus (see data.CorpusSpec)
    training:   any TrainingArguments field
    supervisor: who steers the run (`type: none` for now)

Built-in recipes live in `recipes/*.yaml` next to this file; any other path to a YAML file works too.
`--set training.learning_rate=0.02` overrides one key (the value is read as YAML: 0.02, true, [0.9, 0.99]).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from selfsteer.trainer_bridge.data import VOCAB_SIZE, CorpusSpec

RECIPES_DIR = Path(__file__).parent / "recipes"
SECTIONS = ("model", "data", "training", "supervisor")
YAML_WORDS = {"no", "yes", "on", "off", "y", "n"}


class RecipeError(ValueError):
    pass


def builtin_recipes() -> dict[str, Path]:
    return {path.stem: path for path in sorted(RECIPES_DIR.glob("*.yaml"))}


def load_recipe(name_or_path: str, overrides: list[str] | None = None, seed: int | None = None) -> dict:
    """The recipe as a plain dict, overrides applied. `name` in it says where it came from."""
    path = builtin_recipes().get(name_or_path) or Path(name_or_path)
    if not path.is_file():
        known = ", ".join(builtin_recipes())
        raise RecipeError(f"no recipe {name_or_path!r}: give a built-in name ({known}) or a YAML file")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path} must hold a mapping with sections {', '.join(SECTIONS)}")
    recipe = {section: dict(recipe.get(section) or {}) for section in SECTIONS} | {
        k: v for k, v in recipe.items() if k not in SECTIONS
    }
    for override in overrides or []:
        apply_override(recipe, override)
    if seed is not None:
        recipe["training"]["seed"] = seed
    recipe.setdefault("name", path.stem)
    validate(recipe)
    return recipe


def apply_override(recipe: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise RecipeError(
            f"--set wants key=value with a dotted key (training.learning_rate=0.02), not {override!r}"
        )
    if parts[0] not in SECTIONS and parts[0] != "name":
        raise RecipeError(f"--set {key}: the first part must be one of {', '.join(SECTIONS)}")
    try:
        # YAML 1.1 reads no/yes/on/off as booleans; on a command line they mean the word
        # (eval_strategy=no), so only true/false are booleans here.
        value = (
            raw.strip() if raw.strip().lower() in YAML_WORDS else yaml.safe_load(raw) if raw.strip() else ""
        )
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {key}: cannot read the value {raw!r}: {exc}") from exc
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads 1e-5 (no dot) as text; here it is a number
            value = float(value)
    node = recipe
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = value


def validate(recipe: dict) -> None:
    extra = set(recipe) - set(SECTIONS) - {"name"}
    if extra:
        raise RecipeError(f"unknown recipe keys {sorted(extra)} (known: {', '.join(SECTIONS)})")
    if recipe["model"].get("type", "gpt2") != "gpt2":
        raise RecipeError(f"model.type {recipe['model']['type']!r} is not supported (gpt2)")
    known = {f.name for f in fields(CorpusSpec)}
    unknown = set(recipe["data"]) - known
    if unknown:
        raise RecipeError(f"unknown data keys {sorted(unknown)} (known: {', '.join(sorted(known))})")
    from transformers import TrainingArguments

    known = {f.name for f in fields(TrainingArguments)}
    unknown = set(recipe["training"]) - known
    if unknown:
        raise RecipeError(f"unknown training keys {sorted(unknown)}: not TrainingArguments fields")


def estimated_cost(recipe: dict) -> float:
    """Training FLOPs, roughly (6 x parameters x tokens): what "smallest first" sorts by."""
    model, training = recipe["model"], recipe["training"]
    width, layers = model.get("n_embd", 768), model.get("n_layer", 12)
    context = recipe["data"].get("block_size", 128)
    params = 12 * layers * width**2 + (VOCAB_SIZE + model.get("n_positions", context)) * width
    tokens = training.get("max_steps", 1) * training.get("per_device_train_batch_size", 8) * context
    return 6.0 * params * tokens


def recipes_smallest_first() -> list[str]:
    loaded = {name: load_recipe(name) for name in builtin_recipes()}
    return sorted(loaded, key=lambda name: (estimated_cost(loaded[name]), name))


# -----------------------------------------------------------------------------
# building the parts


@dataclass
class Workload:
    model: Any
    train_dataset: Any  # a SwappableDataset, so `reload_data` can replace it
    eval_dataset: Any
    training_args: Any
    data_factories: dict[str, Any]


def build_workload(recipe: dict, output_dir: str | Path) -> Workload:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments, set_seed

    from selfsteer.trainer_bridge.data import EOS_ID, SwappableDataset, load_corpus

    spec = CorpusSpec(**recipe["data"])
    train, eval_ = load_corpus(spec)
    training = {
        "report_to": "none",
        "disable_tqdm": True,  # the runner shows its own bar; the Trainer's would print every log line
        "dataloader_num_workers": 0,  # reload_data swaps the dataset in this process
        "dataloader_pin_memory": torch.cuda.is_available(),
        **recipe["training"],
        "output_dir": str(output_dir),
    }
    try:
        training_args = TrainingArguments(**training)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"bad training section: {exc}") from exc

    # The same seed gives the same initial weights: replays depend on it.
    set_seed(training_args.seed)
    model_fields = {k: v for k, v in recipe["model"].items() if k != "type"}
    model_fields.setdefault("n_positions", spec.block_size)
    config = GPT2Config(vocab_size=VOCAB_SIZE, bos_token_id=EOS_ID, eos_token_id=EOS_ID, **model_fields)
    model = GPT2LMHeadModel(config)

    def reload_train():
        return load_corpus(spec)[0]

    return Workload(model, SwappableDataset(train), eval_, training_args, {"train": reload_train})
