"""`selfsteer intervener train|calibrate|validate`: TRL's parser of IntervenerConfig, the training, the
calibration and the scoring on labelled rows."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from selfsteer.agents.intervener import (
    ADAPTER_DIR,
    IntervenerConfig,
    calibrate,
    calibration_sample,
    score_row,
    score_rows,
    split,
    train_intervener,
)
from selfsteer.agents.intervener_data import BASELINES, noise_margin, read_rows
from selfsteer.cli.commands.config_parser import ConfigParser
from selfsteer.cli.intervener import TRAIN_DESCRIPTION
from selfsteer.trainer_bridge.records import strict_json


def train_parser() -> ConfigParser:
    """TRL's parser of IntervenerConfig, with `--config FILE.yaml` (imports torch, transformers and TRL)."""
    return ConfigParser((IntervenerConfig,), prog="selfsteer intervener train", description=TRAIN_DESCRIPTION)


def parse_train_args(argv: list[str]) -> IntervenerConfig:
    """`selfsteer intervener train`'s arguments as an IntervenerConfig: the fields from `--config FILE.yaml`,
    then the command line's flags over them. Exits 2 (argparse's way) with a message on stderr for an
    unknown flag or YAML key, an unreadable YAML file, a bad value, or no --data; exits 0 after --help."""
    parser = train_parser()
    (config,) = parser.parse(argv)
    if not config.data:
        parser.error(
            "--data is required (folders from `selfsteer decisions collect`), as a flag or in --config"
        )
    return config


def run(args: argparse.Namespace) -> int:
    if args.action == "calibrate":
        return _calibrate(args)
    if args.action == "validate":
        return _validate(args)

    config = parse_train_args(args.args)
    try:
        metrics = train_intervener(config)
    except ValueError as error:
        print(f"selfsteer intervener train: {error}", file=sys.stderr)
        return 2
    validation = metrics["validation"]
    print(strict_json({k: validation[k] for k in ("intervener", *BASELINES, "labels")}, indent=1))
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
    print(strict_json({"choice_bias": {"action": bias}}, indent=1))
    print(f"-> {Path(args.adapter) / 'calibration.json'}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    adapter = {"intervener": ADAPTER_DIR, "none": None}.get(args.adapter, args.adapter)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        print(f"selfsteer intervener validate: {adapter} is not an adapter folder", file=sys.stderr)
        return 2
    try:
        rows = read_rows(args.data)
        if args.seeds is not None:
            seeds = {int(s) for s in args.seeds.split(",") if s.strip()}
            rows = [row for row in rows if row.spec["seed"] in seeds]
        if not rows:
            raise ValueError("no rows to score (check --data and --seeds)")
        margin = noise_margin(rows)
        policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
        scores = score_rows(rows, margin, adapter=adapter, explain=0, policies=policies)
    except ValueError as error:
        print(f"selfsteer intervener validate: {error}", file=sys.stderr)
        return 2
    scores = {"rows": len(rows), "margin": margin, **scores}
    print(f"{len(rows)} rows, noise margin {margin:.2%}, labels {scores['labels']}\n")
    print("| policy | accuracy [95% CI] | mean regret | actions |\n| --- | --- | --- | --- |")
    for name in [*policies, *(["intervener"] if adapter is not None else [])]:
        print(score_row(name, scores[name]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(strict_json(scores, indent=1) + "\n")
        print(f"-> {args.out}")
    return 0
