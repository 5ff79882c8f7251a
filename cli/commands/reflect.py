"""`selfsteer reflect run|train|eval`: the episodes, the evaluation, and the GRPO training with TRL's
parser of its arguments (ReflectionGRPOConfig and ReflectTrainArguments)."""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
from rich.console import Console

from selfsteer.agents.chat_models import describe_llm_error, make_chat_model
from selfsteer.agents.llm.chat import LocalChatModel
from selfsteer.agents.llm.engine import LocalEngine
from selfsteer.agents.llm.weights import cache_dir, load_embedded_model
from selfsteer.agents.reflector import REFLECTOR_DIR, is_shipped
from selfsteer.cli.commands.config_parser import ConfigParser
from selfsteer.cli.reflect import TRAIN_DESCRIPTION
from selfsteer.evals.plots import plot_grpo
from selfsteer.evals.tasks import load_task, takes_call_mode, takes_option
from selfsteer.evals.tasks.metrics import summarize
from selfsteer.graphs.grpo_reflection import ReflectionGRPOConfig, train
from selfsteer.graphs.reflect import ReflectConfig, mine_failures, reflection_reward, run_episodes
from selfsteer.prompts import REFLECT_STRATEGIES
from selfsteer.tools.tasks import CALL_MODES
from selfsteer.trainer_bridge.records import strict_json
from selfsteer.trainer_bridge.store import DEFAULT_DB_PATH, Store

# -----------------------------------------------------------------------------
# models


@cache
def _embedded_chat(directory: str | None, max_tokens: int):
    """The embedded model, or a trained policy from a folder, as a batched LangChain chat model
    (one per folder: each loads its weights once and owns one engine thread)."""
    chat = LocalChatModel(max_new_tokens=max_tokens)
    if directory:
        if (Path(directory) / "adapter_config.json").is_file():  # a LoRA adapter over the embedded model
            chat._engine = LocalEngine(*load_embedded_model(adapter=directory))
        else:
            chat._engine = LocalEngine(*load_embedded_model(Path(directory)))
    return chat


def _models(args: argparse.Namespace, checkpoint: str | None):
    """(the model that answers, the one that reflects where it is another, the run's model name). bfcl
    with --reflector: the embedded model answers (the frozen actor), `checkpoint` (None: the embedded
    model) reflects."""
    if not args.frozen_actor:
        return _chat_model(args, checkpoint), None, checkpoint or args.llm
    reflector = _embedded_chat(checkpoint, args.max_tokens)
    return _chat_model(args), reflector, f"{args.llm} (reflector: {checkpoint or 'none'})"


def _chat_model(args: argparse.Namespace, checkpoint: str | None = None):
    if checkpoint or args.llm == "local":
        return _embedded_chat(checkpoint, args.max_tokens)
    return make_chat_model(
        args.llm,
        base_url=args.base_url,
        api_key=args.api_key,
        timeout=args.timeout,
        max_tokens=args.max_tokens,
    )


# -----------------------------------------------------------------------------
# actions


def _episodes(args, llm, problems, store, model_name: str, strategy: str | None = None, reflector=None):
    config = ReflectConfig(strategy=strategy or args.strategy, max_retries=args.max_retries)
    run_config = {**_config(args, model_name), "strategy": config.strategy}
    run_id = store.create_run(f"reflect-{args.action}", kind="reflect", config=run_config)
    started = time.perf_counter()
    results = run_episodes(
        llm, problems, config, store, concurrency=args.concurrency, progress=True,
        model_name=model_name, run_id=run_id, seed=args.seed, reflector=reflector,
    )  # reflect eval's settings, passed through # fmt: skip
    return results, run_id, time.perf_counter() - started


def _config(args: argparse.Namespace, model_name: str) -> dict:
    keys = ("task", "call_mode", "feedback", "n", "split", "seed", "strategy", "max_retries", "max_tokens", "checkpoint", "reflector")  # the run's record # fmt: skip
    return {**{k: getattr(args, k) for k in keys}, "model": model_name}


def _write_episodes(path: Path, results) -> None:
    with path.open("w") as file:
        for r in results:
            record = {
                "problem_id": r.problem_id,
                "episode_id": r.episode_id,
                "passed_first": r.passed_first,
                "passed_final": r.passed_final,
                "rewards": r.rewards,
                "attempts": [
                    {k: a.get(k) for k in ("response", "passed", "reason", "cost")} for a in r.attempts
                ],
                "reflections": [{k: x[k] for k in ("text", "n_tokens")} for x in r.reflections],
            }
            file.write(strict_json(record) + "\n")


def _evaluate(
    args, problems, store, console, checkpoint: str | None, label: str, strategy: str | None = None
) -> dict:
    llm, reflector, model_name = _models(args, checkpoint)
    strategy = strategy or args.strategy
    mode = f", {args.call_mode} mode" if args.call_mode else ""
    console.print(
        f"[bold]{label}[/]: {model_name}, {len(problems)} x {args.task} ({args.split}{mode}), {strategy}"
    )
    results, run_id, wall = _episodes(args, llm, problems, store, model_name, strategy, reflector)
    summary = {**summarize(results, seed=args.seed), "model": model_name, "wall_s": wall, "run_id": run_id}
    summary["episodes_per_s"] = len(results) / wall if wall else 0.0
    store.finish_run(run_id, "finished", summary=summary)
    console.print(
        f"  first try {summary['first_try_acc']:.3f} {_ci(summary['first_try_ci95'])}   "
        f"second try {summary['second_try_acc']:.3f} {_ci(summary['second_try_ci95'])}   "
        f"gain {summary['gain']:+.3f} {_ci(summary['gain_ci95'])}   "
        f"reflection {summary['mean_reflection_tokens']:.1f} tokens   {wall:.0f} s"
    )
    if summary["n_failed_first"]:
        console.print(
            f"  retries of the {summary['n_failed_first']} failed first tries: {summary['retry_acc']:.3f} "
            f"{_ci(summary['retry_ci95'])}"
            + (
                f"   regret {summary['regret_first_mean']:.4f} -> {summary['regret_final_mean']:.4f} (mean)"
                if "regret_first_mean" in summary
                else ""
            )
        )
    if args.out:
        _write_episodes(Path(args.out) / f"episodes-{label}.jsonl", results)
    return summary


def _ci(interval) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        return _train(*parse_train_args(args.args))
    console = Console()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint and args.action != "eval":
        console.print("[red]error:[/] --checkpoint is for eval (train takes --model)")
        return 2
    try:
        _resolve_reflector(args)
        _check_feedback(args.task, args.feedback)
        problems = load_task(
            args.task,
            split=args.split,
            n=args.n,
            seed=args.seed,
            call_mode=args.call_mode,
            policy=args.policy,
            feedback=args.feedback or None,
        )
        if not takes_call_mode(args.task):  # countdown: no call modes, none recorded
            args.call_mode = None
    except (ValueError, FileNotFoundError) as error:
        console.print(f"[red]error:[/] {error}")
        return 2
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    try:
        with Store(args.db or DEFAULT_DB_PATH) as store:
            return _act(args, problems, store, console, out)
    except Exception as error:  # a model or endpoint that fails: the one line a person needs
        console.print(f"[red]error:[/] {describe_llm_error(error, args.llm, args.base_url)}")
        return 1


def _check_feedback(task: str, feedback: bool) -> None:
    if feedback and not takes_option(task, "feedback"):
        raise ValueError(f"--feedback is for tasks whose loader takes it (bfcl), not {task}")


def _resolve_reflector(args: argparse.Namespace) -> None:
    """--reflector: the model eval runs as the reflecting model (--checkpoint). For the decisions tasks
    the retries are their own frozen actor's; for bfcl (`frozen_actor`) the first tries and the retries
    are the embedded model's, and only the reflections the reflector's."""
    decisions = args.task.startswith("decisions:")
    args.frozen_actor = False
    if not decisions:
        if args.policy is not None:
            raise ValueError("--policy is for decisions:DIR tasks")
        if args.reflector is None:
            return
        if not takes_call_mode(args.task) or args.llm != "local" or args.checkpoint:
            raise ValueError(
                "--reflector is for decisions:DIR tasks, and for bfcl with the embedded model (no --llm, "
                "no --checkpoint)"
            )
        if args.reflector != "none" and not Path(args.reflector).is_dir():
            raise ValueError(
                f"--reflector {args.reflector}: no such folder (a LoRA adapter or model folder, or none)"
            )
        args.frozen_actor = True
        args.checkpoint = None if args.reflector == "none" else args.reflector
        return
    if args.checkpoint:
        raise ValueError("decisions tasks take --reflector PATH|none, not --checkpoint")
    reflector = args.reflector or (str(REFLECTOR_DIR) if is_shipped() else "none")
    if reflector != "none" and not Path(reflector).is_dir():
        raise ValueError(f"--reflector {reflector}: no such folder (a LoRA adapter or model folder, or none)")
    args.checkpoint = None if reflector == "none" else reflector


def _act(args, problems, store, console, out: Path | None) -> int:
    if args.action == "run":
        llm, reflector, model_name = _models(args, args.checkpoint)
        results, run_id, wall = _episodes(args, llm, problems, store, model_name, reflector=reflector)
        for r in results:
            mark = "[green]pass[/]" if r.passed_final else "[red]fail[/]"
            console.print(
                f"{mark} {r.problem_id}: {len(r.attempts)} attempt(s); {r.attempts[-1]['reason'][:90]}"
            )
            for x in r.reflections:
                console.print(f"    reflection: {x['text'][:120]!r}")
        first = sum(r.passed_first for r in results)
        final = sum(r.passed_final for r in results)
        store.finish_run(run_id, "finished", summary={"n": len(results), "first": first, "final": final})
        console.print(
            f"{first}/{len(results)} first try, {final}/{len(results)} after retries, {wall:.1f} s "
            f"(run {run_id} in {store.path})"
        )
        if out:
            _write_episodes(out / "episodes.jsonl", results)
        return 0

    # eval, the other action
    summary = _evaluate(
        args, problems, store, console, args.checkpoint, "after" if args.checkpoint else "model"
    )
    if args.checkpoint and not args.no_baseline:
        summary["baseline"] = _evaluate(args, problems, store, console, None, "before")
    if args.compare:
        summary["strategies"] = {args.strategy: {k: v for k, v in summary.items() if k != "baseline"}}
        for strategy in (x for x in REFLECT_STRATEGIES if x != args.strategy):
            summary["strategies"][strategy] = _evaluate(
                args, problems, store, console, args.checkpoint, strategy, strategy
            )
    summary.update(
        task=args.task,
        call_mode=args.call_mode,
        split=args.split,
        strategy=args.strategy,
        max_retries=args.max_retries,
    )
    if out:
        (out / "summary.json").write_text(strict_json(summary, indent=2))
        console.print(f"wrote {out / 'summary.json'}")
    else:
        console.print_json(strict_json(summary))
    return 0


# -----------------------------------------------------------------------------
# train: TRL's parser of its arguments, the problems, the training


@dataclass
class ReflectTrainArguments:
    """`reflect train`'s arguments that are not the training's: where the failed first attempts come from,
    and how the run goes. ReflectionGRPOConfig holds the training's own (model, steps, group, lr, ...)."""

    task: str = field(
        default="countdown",
        metadata={
            "help": "countdown, countdown:N, bfcl:CATEGORY (with --call_mode text), decisions:DIR (a "
            "supervisor's lr decisions over the counterfactual rows in DIR) or module:function."
        },
    )
    n: int = field(default=32, metadata={"help": "Problems mined (of each level, with --curriculum)."})
    split: str = field(default="train", metadata={"help": "The task's split.", "choices": ["train", "test"]})
    call_mode: str = field(
        default="tools",
        metadata={
            "help": "bfcl: tools (the retries are tool calls by the frozen embedded model, decoded under "
            "the tools' grammar: only the reflection is trained) or text (the policy's own plain-text "
            "retries). Ignored by tasks without call modes (countdown).",
            "choices": list(CALL_MODES),
        },
    )
    retry_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Tools mode: the frozen actor's retries are sampled at this temperature (0: greedy), so "
            "that a group's reflections can differ in reward."
        },
    )
    retry_samples: int = field(
        default=2,
        metadata={"help": "Tools mode: sampled retries per reflection; the reward is the share that pass."},
    )
    feedback: bool = field(
        default=False,
        metadata={
            "help": "bfcl: the reflection and the plain retry are told which check failed (the validator's "
            "reason without the answer key's accepted values; prompts/reflect_feedback.yaml)."
        },
    )
    strategy: str = field(
        default="reflect_attempt",
        metadata={
            "help": "What the retry sees: the reflection only (reflect), with the failed attempt "
            "(reflect_attempt), plus rewarded reflections of earlier episodes (memory).",
            "choices": [strategy for strategy in REFLECT_STRATEGIES if strategy != "retry"],
        },
    )
    max_tokens: int = field(default=96, metadata={"help": "Tokens of each first attempt mined."})
    policy: str | None = field(
        default=None,
        metadata={
            "help": "decisions:DIR: the supervisor whose decisions are the first tries: intervener (None: "
            "the shipped one), keep, rule, hypergradient, ... or module:Class."
        },
    )
    curriculum: str | None = field(
        default=None,
        metadata={
            "help": "Countdown: train level by level, easiest first, e.g. 2,3,4 (--n problems of each "
            "level; --task is then ignored; shuffle_dataset defaults to false)."
        },
    )
    rollout: str = field(
        default="trl",
        metadata={
            "help": "How reflections and retries are decoded: trl (TRL's model.generate, or vLLM on a GPU "
            "where installed) or engine (the embedded model's batched engine around the model being "
            "trained; measured no faster on a 2-core CPU, see evals/bench/grpo.py).",
            "choices": ["trl", "engine"],
        },
    )
    resume: bool = field(
        default=True,
        metadata={"help": "Resume from the newest checkpoint in output_dir (--no_resume: start afresh)."},
    )
    threads: int | None = field(default=None, metadata={"help": "Torch CPU threads (None: torch's)."})


def train_parser() -> ConfigParser:
    """TRL's parser of ReflectionGRPOConfig and ReflectTrainArguments, with `--config FILE.yaml` (imports
    torch, transformers and TRL)."""
    return ConfigParser(
        (ReflectionGRPOConfig, ReflectTrainArguments),
        prog="selfsteer reflect train",
        description=TRAIN_DESCRIPTION,
    )


def parse_train_args(argv: list[str]) -> tuple[ReflectionGRPOConfig, ReflectTrainArguments]:
    """`selfsteer reflect train`'s arguments: the fields from `--config FILE.yaml`, then the command line's
    flags over them. Exits 2 (argparse's way) with a message on stderr for an unknown flag or YAML key, an
    unreadable YAML file, a bad value (ReflectionGRPOConfig's and TRL's own checks included); exits 0
    after --help. With --curriculum, shuffle_dataset defaults to false (the rows come level by level)."""
    parser = train_parser()
    config, arguments = parser.parse(argv)
    if arguments.curriculum:  # a default, so that the file or a flag can still set it
        parser.set_defaults(shuffle_dataset=False)
        config, arguments = parser.parse(argv)
    return config, arguments


def _train_problems(arguments: ReflectTrainArguments, seed: int) -> list:
    """The problems whose failed first attempts are the training set (checked before any model loads)."""
    if arguments.policy is not None and not arguments.task.startswith("decisions:"):
        raise ValueError("--policy is for decisions:DIR tasks")
    if arguments.curriculum:
        return _curriculum_problems(arguments, seed)
    _check_feedback(arguments.task, arguments.feedback)
    return load_task(
        arguments.task,
        split=arguments.split,
        n=arguments.n,
        seed=seed,
        call_mode=arguments.call_mode,
        policy=arguments.policy,
        feedback=arguments.feedback or None,
    )


def _curriculum_problems(arguments, seed: int) -> list:
    """--n problems of each Countdown level in --curriculum, easiest (fewest numbers) first; --task becomes
    the levels (countdown:2+3+4)."""
    try:
        levels = sorted(int(level) for level in arguments.curriculum.split(","))
    except ValueError:
        raise ValueError(
            f"--curriculum takes Countdown levels like 2,3,4, not {arguments.curriculum!r}"
        ) from None
    arguments.task = "countdown:" + "+".join(map(str, levels))
    return [
        p for level in levels for p in load_task(f"countdown:{level}", arguments.split, arguments.n, seed)
    ]


def _in_curriculum_order(rows: list[dict], problems: list, seed: int) -> list[dict]:
    """Training rows level by level, in the order of `problems`, shuffled within each level only."""
    level = {p.id: p.task for p in problems}
    order = list(dict.fromkeys(p.task for p in problems))
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return sorted(rows, key=lambda row: order.index(level[row["problem_id"]]))


def _train(config: ReflectionGRPOConfig, arguments: ReflectTrainArguments) -> int:
    console = Console()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    try:  # the call mode first: a curriculum renames the task countdown:2+3, which no loader knows
        takes = not arguments.curriculum and takes_call_mode(arguments.task)
        call_mode = arguments.call_mode if takes else None  # countdown: no call modes, none recorded
        problems = _train_problems(arguments, config.seed)
    except (ValueError, FileNotFoundError) as error:
        console.print(f"[red]error:[/] {error}")
        return 2
    task = arguments.task
    embedded = not config.model  # the default: the embedded model, trained from its folder in the cache
    if embedded:
        load_embedded_model()  # converts the GGUF once, so that cache_dir() holds a model folder
        config.model = str(cache_dir())
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    console.print(
        f"mining failed first attempts of {len(problems)} x {task} ({arguments.split}) with {config.model}"
    )
    miner = _embedded_chat(None if embedded else config.model, arguments.max_tokens)
    rows = mine_failures(miner, problems, progress=True)
    console.print(f"{len(rows)} failures of {len(problems)} first attempts: the training set")
    if not rows:
        console.print("[yellow]nothing to train on: every first attempt passed[/]")
        return 1
    if arguments.curriculum:
        rows = _in_curriculum_order(rows, problems, config.seed)
    rollout = arguments.rollout
    console.print(
        f"GRPO: {config.max_steps} steps x {config.prompts_per_step} failure(s) x {config.num_generations} "
        f"reflections, rollouts by {rollout}, "
        f"{'LoRA r=' + str(config.lora_r) if config.lora_r else 'every weight'}"
    )
    actor = None
    if any(problem.tools for problem in problems):  # tool-call retries: the frozen embedded model's
        actor = _embedded_chat(None, config.max_retry_tokens)
        console.print(
            f"retries: tool calls by the frozen embedded model, {arguments.retry_samples} per reflection "
            f"at temperature {arguments.retry_temperature}"
        )
    reward_fn = reflection_reward(
        problems,
        arguments.strategy,
        actor=actor,
        retry_temperature=arguments.retry_temperature,
        retry_samples=arguments.retry_samples,
        seed=config.seed,
    )
    result = train(
        config,
        rows,
        reward_fn,
        resume=arguments.resume,
        engine_factory=LocalEngine if rollout == "engine" else None,
    )
    log = [entry for entry in result["log_history"] if "reward" in entry]
    summary = {
        "task": task, "call_mode": call_mode, "n_problems": len(problems), "n_failures": len(rows),
        "steps": config.max_steps, "rollout": rollout, "curriculum": arguments.curriculum,
        "wall_s": time.perf_counter() - started, "final_model": result["final_model"],
        "resumed_from": result["resumed_from"], "config": config.to_dict(),
        "reward_per_step": [entry["reward"] for entry in log], "train_metrics": result["metrics"],
    }  # summary.json's fields # fmt: skip
    zero_std = [entry.get("frac_reward_zero_std", 0.0) for entry in log]
    summary["frac_reward_zero_std"] = sum(zero_std) / len(zero_std) if zero_std else None
    (out / "train_summary.json").write_text(strict_json(summary, indent=2, default=str))
    if log:
        plot_grpo(result["log_history"], out / "reward.png", f"GRPO on reflections: {task}")
    console.print(
        f"trained {config.max_steps} steps in {summary['wall_s']:.0f} s; policy in {result['final_model']}; "
        f"mean reward per step: {[round(r, 3) for r in summary['reward_per_step']]}"
    )
    if zero_std and min(zero_std) >= 1.0:
        console.print(
            "[yellow]warning:[/] in every group all reflections earned the same reward, so every "
            "advantage and every loss was zero and the weights did not move. The model never (or "
            "always) passes on the retry: use a stronger model or an easier task (Bensal et al.: "
            "models under 1.5B parameters barely gain)."
        )
    return 0
