"""Recipes load as typed objects: every built-in loads, `--set` overrides and coerces, and a wrong key or
a wrongly typed value is a RecipeError naming the key and the file, before any model is built."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, TrainingArguments

from selfsteer.trainer_bridge.data import CorpusSpec
from selfsteer.trainer_bridge.recipe import (
    RecipeError,
    SupervisorSpec,
    builtin_recipes,
    load_recipe,
    parse_recipe,
)


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_builtin_recipe_loads_as_typed_sections(name):
    recipe = load_recipe(name)
    assert set(recipe) == {"model", "data", "training", "supervisor", "name"} and recipe["name"] == name
    typed = parse_recipe(recipe)
    assert isinstance(typed.model, GPT2Config) and isinstance(typed.data, CorpusSpec)
    assert isinstance(typed.training, TrainingArguments) and isinstance(typed.supervisor, SupervisorSpec)
    assert typed.training.max_steps == recipe["training"]["max_steps"]
    assert typed.training.learning_rate == recipe["training"]["learning_rate"]
    assert typed.model.n_layer == recipe["model"]["n_layer"] and typed.data == CorpusSpec(**recipe["data"])
    assert typed.training.report_to == [] and typed.training.disable_tqdm  # the run's own defaults


def test_set_overrides_nested_keys_with_yaml_values():
    recipe = load_recipe(
        "tiny",
        ["training.learning_rate=1e-5", "training.eval_strategy=no", "data.block_size=16", "name=mine",
         "training.use_cpu=true", "supervisor.type=rule"],
        seed=3,
    )  # the overrides as --set takes them # fmt: skip
    assert recipe["training"]["learning_rate"] == 1e-5  # YAML 1.1 reads 1e-5 as text; --set makes it a number
    assert recipe["training"]["eval_strategy"] == "no"  # the word, not YAML's boolean
    assert recipe["training"]["use_cpu"] is True and recipe["training"]["seed"] == 3
    assert (recipe["data"]["block_size"], recipe["name"], recipe["supervisor"]["type"]) == (
        16,
        "mine",
        "rule",
    )
    typed = parse_recipe(recipe)
    assert typed.training.learning_rate == 1e-5 and typed.training.seed == 3 and typed.training.use_cpu
    assert typed.model.n_positions == 32  # tiny's own; a recipe without it gets the block size
    # a whole number for an int field is coerced, the dict kept as given
    assert parse_recipe(load_recipe("tiny", ["training.max_steps=5.0"])).training.max_steps == 5


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("training.no_such_field=1", ["training.no_such_field", "TrainingArguments"]),
        ("data.block_sise=3", ["data.block_sise", "CorpusSpec"]),
        ("model.n_layers=3", ["model.n_layers", "GPT2Config"]),
        ("supervisor.kind=rule", ["supervisor.kind"]),
        ("training.max_steps=abc", ["training.max_steps", "'abc'", "integer"]),
        ("training.learning_rate=[0.1]", ["training.learning_rate", "number"]),
        ("data.block_size=1.5", ["data.block_size", "integer"]),
        ("model.n_embd=wide", ["model.n_embd", "integer"]),
        ("model.vocab_size=300", ["model.vocab_size", "byte-level"]),
        ("training.eval_strategy=sometimes", ["sometimes", "IntervalStrategy"]),
    ],
)
def test_a_wrong_key_or_type_from_set_names_the_key_and_the_file(override, names):
    with pytest.raises(RecipeError) as error:
        load_recipe("tiny", [override])
    message = str(error.value)
    assert "tiny.yaml" in message and all(name in message for name in names), message


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("model: {n_layer: 1}\ntraining: {max_stepz: 3}\n", r"mine\.yaml: training\.max_stepz: unknown key"),
        ("model: {n_layer: two}\n", r"mine\.yaml: model\.n_layer = 'two'"),
        ("model: {n_layer: 1}\nschedule: {}\n", r"mine\.yaml: unknown recipe keys \['schedule'\]"),
        ("training: 3\n", r"mine\.yaml: training must be a mapping"),
    ],
)
def test_a_wrong_key_or_type_in_the_file_names_it(tmp_path, text, pattern):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(str(path))


def test_sections_left_out_take_their_classes_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("training: {max_steps: 3}\n")
    typed = parse_recipe(load_recipe(str(path)))
    assert typed.model.n_layer == GPT2Config().n_layer and typed.data == CorpusSpec()


def test_bad_set_syntax_is_refused():
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe("tiny", ["training.learning_rate"])
    with pytest.raises(RecipeError, match="first part"):
        load_recipe("tiny", ["optimizer.lr=1"])
    with pytest.raises(RecipeError, match="no recipe 'nope'"):
        load_recipe("nope")
