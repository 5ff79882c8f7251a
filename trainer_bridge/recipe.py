"""Training recipes: YAML files with four sections, each checked against a typed class as it loads.

    model:      the architecture: `type: gpt2` plus any GPT2Config field, trained from scratch
    data:       the corpus: data.CorpusSpec
    training:   any TrainingArguments field
    supervisor: who steers the run: SupervisorSpec (`type: none` unless `selfsteer train` says otherwise)

Built-in recipes live in `recipes/*.yaml` next to this file; any other path to a YAML file works too.
`--set training.learning_rate=0.02` overrides one key (the value is read as YAML: 0.02, true, [0.9, 0.99]).

`load_recipe` checks a recipe by building it: an unknown key or a value of the wrong type is a
RecipeError naming the key and the file (or the --set that gave it), raised before any model is built.
It returns the recipe as the plain dict it read, because that is what a run stores (its run config) and
what a replay or a resume rebuilds from; `parse_recipe` turns such a dict into the typed `Recipe` (a
GPT2Config, a CorpusSpec, a TrainingArguments, a SupervisorSpec, values coerced to their fields' types),
which `build_workload` trains.
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import TypeAdapter, ValidationError
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments, set_seed

from selfsteer.trainer_bridge.data import EOS_ID, VOCAB_SIZE, CorpusSpec, SwappableDataset, load_corpus

RECIPES_DIR = Path(__file__).parent / "recipes"
SECTIONS = ("model", "data", "training", "supervisor")
YAML_WORDS = {"no", "yes", "on", "off", "y", "n"}
# GPT2Config fields the byte-level corpus fixes; a recipe cannot set them.
FIXED_MODEL_FIELDS = {"vocab_size": VOCAB_SIZE, "bos_token_id": EOS_ID, "eos_token_id": EOS_ID}
# TrainingArguments a recipe run starts from, under the recipe's own `training` section.
RUN_DEFAULTS = {
    "report_to": "none",
    "disable_tqdm": True,  # the runner shows its own bar; the Trainer's would print every log line
    "dataloader_num_workers": 0,  # reload_data swaps the dataset in this process
}


class RecipeError(ValueError):
    pass


@dataclass
class SupervisorSpec:
    """What the `supervisor:` section of a recipe says."""

    type: str = "none"  # none, rule, plateau, llm, intervener, human or module:Class


@dataclass
class Recipe:
    """A recipe with every section built: what `build_workload` trains."""

    name: str
    model: Any  # a transformers GPT2Config
    data: CorpusSpec
    training: Any  # a transformers TrainingArguments
    supervisor: SupervisorSpec


def builtin_recipes() -> dict[str, Path]:
    return {path.stem: path for path in sorted(RECIPES_DIR.glob("*.yaml"))}


def load_recipe(name_or_path: str, overrides: list[str] | None = None, seed: int | None = None) -> dict:
    """The recipe as a plain dict, overrides applied and every key checked. `name` says where it came from."""
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
    for section in SECTIONS:
        if not isinstance(recipe.get(section) or {}, dict):
            raise RecipeError(f"{path}: {section} must be a mapping of keys, not {recipe[section]!r}")
    recipe = {section: dict(recipe.get(section) or {}) for section in SECTIONS} | {
        k: v for k, v in recipe.items() if k not in SECTIONS
    }
    overridden = set()
    for override in overrides or []:
        overridden.add(apply_override(recipe, override))
    if seed is not None:
        recipe["training"]["seed"] = seed
    recipe.setdefault("name", path.stem)
    parse_recipe(recipe, source=str(path), overridden=overridden)
    return recipe


def apply_override(recipe: dict, override: str) -> str:
    """Apply one `--set key=value`; returns the dotted key."""
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
    return ".".join(parts)


def parse_recipe(
    recipe: dict,
    source: str = "recipe",
    overridden: Collection[str] = (),
    output_dir: str | Path | None = None,
) -> Recipe:
    """Every section of a recipe dict built as its typed class (the dict itself is left as it is).

    source: the file it came from; overridden: the dotted keys a --set gave (errors name those instead).
    output_dir: the TrainingArguments' output_dir (None: transformers' placeholder, for a check only)."""

    def where(key: str) -> str:
        return f"{source}: --set {key}" if key in overridden else f"{source}: {key}"

    extra = set(recipe) - set(SECTIONS) - {"name"}
    if extra:
        raise RecipeError(f"{source}: unknown recipe keys {sorted(extra)} (known: {', '.join(SECTIONS)})")
    sections = {name: recipe.get(name) or {} for name in SECTIONS}
    model_type = sections["model"].get("type", "gpt2")
    if model_type != "gpt2":
        raise RecipeError(f"{where('model.type')}: {model_type!r} is not supported (gpt2)")
    model = {k: v for k, v in sections["model"].items() if k != "type"}
    fixed = set(model) & set(FIXED_MODEL_FIELDS)
    if fixed:
        raise RecipeError(f"{where('model.' + min(fixed))}: fixed by the byte-level corpus, not a recipe key")
    model = typed_fields(GPT2Config, model, lambda key: where(f"model.{key}"))
    data = CorpusSpec(**typed_fields(CorpusSpec, sections["data"], lambda key: where(f"data.{key}")))
    training = typed_fields(TrainingArguments, sections["training"], lambda key: where(f"training.{key}"))
    supervisor = typed_fields(SupervisorSpec, sections["supervisor"], lambda key: where(f"supervisor.{key}"))
    supervisor = SupervisorSpec(**supervisor)

    model.setdefault("n_positions", data.block_size)
    try:  # the checks the classes make themselves (strict GPT2Config fields, an eval_strategy that exists)
        config = GPT2Config(**FIXED_MODEL_FIELDS, **model)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{source}: bad model section: {exc}") from exc
    defaults = {**RUN_DEFAULTS, "dataloader_pin_memory": torch.cuda.is_available()}
    try:
        training = TrainingArguments(**{**defaults, **training, "output_dir": output_dir})
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{source}: bad training section: {exc}") from exc
    return Recipe(recipe.get("name", "recipe"), config, data, training, supervisor)


def typed_fields(cls: type, values: dict, label: Callable[[str], str]) -> dict:
    """`values` as fields of the dataclass `cls`: every key one of its fields, every value of that field's
    type, coerced the way pydantic does (5.0 -> 5 for an int, "1e-3" -> 0.001 for a float). A RecipeError
    otherwise, which names the key as `label(key)` says (where it came from)."""
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise RecipeError(f"{label(unknown[0])}: unknown key: not a {cls.__name__} field")
    checked = {}
    for key, value in values.items():
        try:
            checked[key] = _adapter(types[key]).validate_python(value)
        except ValidationError as exc:
            wanted = getattr(types[key], "__name__", None) or str(types[key])
            message = exc.errors()[0]["msg"]
            raise RecipeError(f"{label(key)} = {value!r}: {message} ({wanted})") from None
    return checked


@cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, localns={"torch": torch})  # GPT2Config names torch.dtype
    return {f.name: hints[f.name] for f in fields(cls) if f.init and not f.name.startswith("_")}


@cache
def _adapter(annotation: Any):
    return TypeAdapter(annotation)


def estimated_cost(recipe: dict | Recipe) -> float:
    """Training FLOPs, roughly (6 x parameters x tokens): what "smallest first" sorts by."""
    recipe = recipe if isinstance(recipe, Recipe) else parse_recipe(recipe)
    model, context = recipe.model, recipe.data.block_size
    params = 12 * model.n_layer * model.n_embd**2 + (VOCAB_SIZE + model.n_positions) * model.n_embd
    tokens = max(recipe.training.max_steps, 1) * recipe.training.per_device_train_batch_size * context
    return 6.0 * params * tokens


def recipes_smallest_first() -> list[str]:
    loaded = {name: parse_recipe(load_recipe(name)) for name in builtin_recipes()}
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


def build_workload(recipe: dict | Recipe, output_dir: str | Path) -> Workload:
    """The model, data and TrainingArguments of a recipe (a dict as `load_recipe` returns and runs store)."""
    if isinstance(recipe, Recipe):
        recipe = replace(recipe, training=replace(recipe.training, output_dir=str(output_dir)))
    else:
        recipe = parse_recipe(recipe, recipe.get("name", "recipe"), output_dir=str(output_dir))
    train, eval_ = load_corpus(recipe.data)
    # The same seed gives the same initial weights: replays depend on it.
    set_seed(recipe.training.seed)
    model = GPT2LMHeadModel(recipe.model)

    def reload_train():
        return load_corpus(recipe.data)[0]

    return Workload(model, SwappableDataset(train), eval_, recipe.training, {"train": reload_train})
