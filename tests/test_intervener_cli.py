"""`selfsteer intervener train`'s arguments, parsed by TRL's TrlParser into an IntervenerConfig: a YAML
`--config`, the command line over it, IntervenerConfig's own defaults elsewhere, and exit 2 with a message
for what is not a field. No training, no model."""

import dataclasses

import pytest

from selfsteer.agents.intervener import IntervenerConfig
from selfsteer.cli.commands.intervener import parse_train_args
from selfsteer.cli.main import main


def test_the_yaml_sets_fields_and_the_command_line_wins(tmp_path):
    config_file = tmp_path / "intervener.yaml"
    config_file.write_text(
        "max_examples: 5\nlearning_rate: 0.002\nlora_r: 4\nvalidation_seeds: [3, 4]\ndata: [runs/a, runs/b]\n"
    )
    config = parse_train_args(["--config", str(config_file), "--max_examples", "7", "--output_dir", "out"])
    assert isinstance(config, IntervenerConfig)
    assert config.max_examples == 7  # the command line over the file
    assert config.learning_rate == 0.002 and config.lora_r == 4 and config.validation_seeds == [3, 4]
    assert config.data == ["runs/a", "runs/b"] and config.output_dir == "out"
    assert config.lora_alpha == 8  # not given: 2 * lora_r
    # Every other field is IntervenerConfig's default (SFTConfig's own where the intervener sets none).
    defaults = IntervenerConfig()
    given = {"max_examples", "learning_rate", "lora_r", "lora_alpha", "validation_seeds", "data"}
    given.add("output_dir")
    for field in dataclasses.fields(IntervenerConfig):
        if field.init and field.name not in given:
            assert getattr(config, field.name) == getattr(defaults, field.name), field.name
    assert (config.num_train_epochs, config.strategy, config.seed) == (1.0, "intervener", 0)


SEEDS = ["--validation_seeds", "2", "3", "--seed", "1"]


def test_flags_alone_with_dashed_aliases_and_an_explicit_lora_alpha():
    config = parse_train_args(["--data", "runs/cf", "--lora-r", "16", "--lora_alpha", "5"] + SEEDS)
    assert (config.data, config.lora_r, config.lora_alpha) == (["runs/cf"], 16, 5)
    assert (config.validation_seeds, config.seed, config.max_examples) == ([2, 3], 1, 960)
    assert IntervenerConfig(lora_r=4).lora_alpha == 8 and IntervenerConfig().lora_alpha == 16


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--output_dir", "out"], "--data is required"),
        (["--data", "runs/cf", "--examples", "3"], "unrecognized arguments: --examples 3"),
        (["--data", "runs/cf", "--strategy", "nope"], "invalid choice: 'nope'"),
        (["--data", "runs/cf", "--max_examples", "many"], "invalid int value: 'many'"),
        (["--config", "missing.yaml", "--data", "runs/cf"], "cannot read missing.yaml"),
        (["--config", "bad.yaml"], "not fields of IntervenerConfig: examples, out"),
        (["--config", "list.yaml"], "must contain a YAML mapping"),
    ],
)
def test_what_is_not_a_field_exits_2_with_a_message(tmp_path, monkeypatch, capsys, argv, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("data: [runs/cf]\nexamples: 3\nout: x\n")
    (tmp_path / "list.yaml").write_text("- data\n")
    with pytest.raises(SystemExit) as exit_:
        parse_train_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("selfsteer intervener train: error: ") and says in err, err


def test_the_command_trains_nothing_on_a_bad_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["intervener", "train", "--data", "runs/cf", "--output_dir", "out", "--bogus", "1"])
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_errors_of_the_data_exit_2(tmp_path, capsys):
    # A folder with no rows: train_intervener's ValueError, before any model is loaded.
    (tmp_path / "empty").mkdir()
    code = main(["intervener", "train", "--data", str(tmp_path / "empty"), "--output_dir", str(tmp_path)])
    assert code == 2 and capsys.readouterr().err.startswith("selfsteer intervener train: ")
