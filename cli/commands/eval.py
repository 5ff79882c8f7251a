"""`selfsteer eval lr-suite`: the suite's config from the flags, checked, then run."""

from __future__ import annotations

import argparse
import sys

from selfsteer.agents.registry import BUILT_IN
from selfsteer.evals.lr_suite import WORKLOADS, SuiteConfig
from selfsteer.evals.lr_suite_names import BASELINES, DEFAULT_SUPERVISORS, HELD_OUT_SUPERVISORS, POPULATIONS
from selfsteer.evals.lr_suite_run import main


def run(args: argparse.Namespace) -> int:
    NOT_SUPERVISORS = (*BASELINES, *POPULATIONS)

    recipes, supervisors = args.recipes, args.supervisors
    if args.held_out:
        recipes = ",".join(WORKLOADS) if recipes == "tiny,small" else recipes
        supervisors = (
            ",".join(HELD_OUT_SUPERVISORS) if supervisors == ",".join(DEFAULT_SUPERVISORS) else supervisors
        )
    config = SuiteConfig(
        recipes=recipes.split(","), seeds=args.seeds, supervisors=supervisors.split(","),
        llm=args.llm, base_url=args.base_url, api_key=args.api_key, retries=args.retries, hold=args.hold,
        ray=args.ray, ray_address=args.ray_address, ray_cpus=args.ray_cpus,
        cpus_per_trial=args.cpus_per_trial, max_concurrent=args.max_concurrent, reflector=args.reflector,
    )  # lr-suite's flags into its config # fmt: skip
    if args.lrs is not None:
        config.lrs = dict.fromkeys(config.recipes, args.lrs)
    if args.grid is not None:
        config.grid_lrs = dict.fromkeys(config.recipes, args.grid)
    if args.max_steps:
        config.max_steps = dict.fromkeys(config.recipes, args.max_steps)
    if args.eval_steps:
        config.eval_steps = dict.fromkeys(config.recipes, args.eval_steps)
    if args.self_correct:  # a self-correcting twin of every supervisor
        config.supervisors += [
            f"{s}+sc" for s in config.supervisors if s not in NOT_SUPERVISORS and not s.endswith("+sc")
        ]
    # every supervisor that decides alone (a person, or one acting through tools, does not suit a suite)
    known = (*(name for name in BUILT_IN if name not in ("human", "tools")), *NOT_SUPERVISORS)
    corrected = [s for s in config.supervisors if "+" in s and s.partition("+")[0] in NOT_SUPERVISORS]
    if corrected:
        print(
            f"selfsteer eval lr-suite: {', '.join(corrected)}: no self-correction for a row that is no "
            "supervisor (a baseline or a population)",
            file=sys.stderr,
        )
        return 2
    named = [s.partition("+")[0] for s in config.supervisors]
    # `module:Class` is a plug-in: the run itself reports one that cannot be loaded.
    unknown = [s for s in named if s not in known and ":" not in s]
    if unknown:
        print(f"selfsteer eval lr-suite: unknown supervisors {unknown}", file=sys.stderr)
        return 2
    main(config, args.out)
    return 0
