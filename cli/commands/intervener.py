"""`selfsteer intervener train|calibrate`: TRL's parser of IntervenerConfig, the training and the
calibration."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from trl import TrlParser

from selfsteer.agents.intervener import (
    IntervenerConfig,
    calibrate,
    calibration_sample,
    split,
    train_intervener,
)
from selfsteer.agents.intervener_data import read_rows
from selfsteer.cli.intervener import TRAIN_DESCRIPTION


def train_parser():
    """TRL's parser of IntervenerConfig, with `--config FILE.yaml` (imports torch, transformers and TRL)."""

    class Parser(TrlParser):
        def error(self, message):  # the message without the usage of 200 flags
            self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists every flag)\n")

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    parser = Parser(
        (IntervenerConfig,),
        prog="selfsteer intervener train",
        description=TRAIN_DESCRIPTION,
        formatter_class=Formatter,
    )
    # TrlParser reads `--config FILE` itself (before the other flags); declared here for --help only.
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="a YAML mapping of field names to values; the command line's flags win over it",
    )
    return parser


def parse_train_args(argv: list[str]):
    """`selfsteer intervener train`'s arguments as an IntervenerConfig: the fields from `--config FILE.yaml`,
    then the command line's flags over them. Exits 2 (argparse's way) with a message on stderr for an
    unknown flag or YAML key, an unreadable YAML file, a bad value, or no --data; exits 0 after --help."""
    parser = train_parser()
    argv = list(argv)
    for i, arg in enumerate(argv):  # TrlParser reads `--config FILE`, not `--config=FILE`
        if arg.startswith("--config="):
            argv[i : i + 1] = ["--config", arg.split("=", 1)[1]]
            break
    if argv.count("--config") > 1:
        parser.error("--config given more than once")
    if argv and argv[-1] == "--config":
        parser.error("argument --config: expected a YAML file")
    try:
        config, *_, from_file, from_command_line = parser.parse_args_and_config(
            args=argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except OSError as error:
        parser.error(f"--config: cannot read {error.filename}: {error.strerror}")
    except yaml.YAMLError as error:
        parser.error(f"--config: not YAML: {error}")
    except ValueError as error:  # a YAML file that is not a mapping, a bad value of a field
        parser.error(str(error))
    if from_command_line:
        parser.error(f"unrecognized arguments: {' '.join(from_command_line)}")
    if from_file:  # TrlParser hands back each unknown key as `--KEY VALUE`
        unknown = ", ".join(key.removeprefix("--") for key in from_file[::2])
        parser.error(
            f"--config {argv[argv.index('--config') + 1]}: not fields of IntervenerConfig: {unknown}"
        )
    if not config.data:
        parser.error(
            "--data is required (folders from `selfsteer decisions collect`), as a flag or in --config"
        )
    return config


def run(args: argparse.Namespace) -> int:
    if args.action == "calibrate":
        return _calibrate(args)

    config = parse_train_args(args.args)
    try:
        metrics = train_intervener(config)
    except ValueError as error:
        print(f"selfsteer intervener train: {error}", file=sys.stderr)
        return 2
    validation = metrics["validation"]
    print(json.dumps({k: validation[k] for k in ("intervener", "keep", "rule", "labels")}, indent=1))
    print(f"adapter, card and metrics -> {config.output_dir}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    if not (Path(args.adapter) / "adapter_config.json").is_file():
        print(f"selfsteer intervener calibrate: {args.adapter} is not an adapter folder", file=sys.stderr)
        return 2
    try:
        rows = read_rows(args.data)
    except ValueError as error:
        print(f"selfsteer intervener calibrate: {error}", file=sys.stderr)
        return 2
    config = IntervenerConfig(
        validation_seeds=[int(s) for s in args.validation_seeds.split(",") if s.strip()]
    )
    train_rows, _ = split(rows, config)
    if not train_rows:
        print("selfsteer intervener calibrate: no training rows in --data", file=sys.stderr)
        return 2
    bias = calibrate(args.adapter, calibration_sample(train_rows, args.rows, args.seed))
    print(json.dumps({"choice_bias": {"action": bias}}, indent=1))
    print(f"-> {Path(args.adapter) / 'calibration.json'}")
    return 0
