"""`selfsteer reflect run|train|eval`: the episodes, the evaluation and the GRPO training."""

from __future__ import annotations

import argparse
import json
import random
import time
from functools import cache
from pathlib import Path

import torch
import yaml
from rich.console import Console
from transformers import HfArgumentParser

from selfsteer.agents.chat_models import describe_llm_error, make_chat_model
from selfsteer.agents.llm.chat import LocalChatModel
from selfsteer.agents.llm.engine import LocalEngine
from selfsteer.agents.llm.weights import cache_dir, load_embedded_model
from selfsteer.agents.reflector import REFLECTOR_DIR, is_shipped
from selfsteer.cli.reflect import DEVICE_USE_CPU
from selfsteer.evals.plots import plot_grpo
from selfsteer.evals.tasks import load_task, takes_call_mode
from selfsteer.evals.tasks.metrics import summarize
from selfsteer.graphs.grpo_reflection import ReflectionGRPOConfig, train
from selfsteer.graphs.reflect import ReflectConfig, mine_failures, reflection_reward, run_episodes
from selfsteer.prompts import REFLECT_STRATEGIES
from selfsteer.trainer_bridge.recipe import typed_fields
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


def _episodes(args, llm, problems, store, model_name: str, strategy: str | None = None):
    config = ReflectConfig(strategy=strategy or args.strategy, max_retries=args.max_retries)
    run_config = {**_config(args, model_name), "strategy": config.strategy}
    run_id = store.create_run(f"reflect-{args.action}", kind="reflect", config=run_config)
    started = time.perf_counter()
    results = run_episodes(
        llm, problems, config, store, concurrency=args.concurrency, progress=True,
        model_name=model_name, run_id=run_id, seed=args.seed,
    )  # reflect eval's settings, passed through # fmt: skip
    return results, run_id, time.perf_counter() - started


def _config(args: argparse.Namespace, model_name: str) -> dict:
    keys = ("task", "call_mode", "n", "split", "seed", "strategy", "max_retries", "max_tokens", "checkpoint")
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
            file.write(json.dumps(record) + "\n")


def _evaluate(
    args, problems, store, console, checkpoint: str | None, label: str, strategy: str | None = None
) -> dict:
    model_name = checkpoint or args.llm
    strategy = strategy or args.strategy
    mode = f", {args.call_mode} mode" if args.call_mode else ""
    console.print(
        f"[bold]{label}[/]: {model_name}, {len(problems)} x {args.task} ({args.split}{mode}), {strategy}"
    )
    results, run_id, wall = _episodes(
        args, _chat_model(args, checkpoint), problems, store, model_name, strategy
    )
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
    console = Console()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.split = args.split or ("train" if args.action == "train" else "test")
    if args.checkpoint and args.action != "eval":
        console.print("[red]error:[/] --checkpoint is for eval (train takes --model)")
        return 2
    try:
        _resolve_reflector(args)
        if args.curriculum:
            problems = _curriculum_problems(args)
        else:
            problems = load_task(
                args.task,
                split=args.split,
                n=args.n,
                seed=args.seed,
                call_mode=args.call_mode,
                policy=args.policy,
            )
        if not takes_call_mode(args.task):  # countdown: no call modes, none recorded
            args.call_mode = None
        args.grpo_extra = _grpo_config(args.grpo_config)
    except (ValueError, FileNotFoundError) as error:
        console.print(f"[red]error:[/] {error}")
        return 2
    if args.action == "train" and any(problem.tools for problem in problems):
        console.print(
            "[red]error:[/] GRPO with tools-mode retries is not supported (the policy's retries are plain "
            "text): train with --call-mode text"
        )
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


def _resolve_reflector(args: argparse.Namespace) -> None:
    """--reflector, for the decisions tasks: the model eval runs as the reflecting model (--checkpoint)."""
    decisions = args.task.startswith("decisions:")
    if not decisions:
        if args.reflector is not None or args.policy is not None:
            raise ValueError("--reflector and --policy are for decisions:DIR tasks")
        return
    if args.action == "train":
        if args.reflector is not None:
            raise ValueError(
                "train trains a reflector from --model (default: the embedded model); no --reflector"
            )
        return
    if args.checkpoint:
        raise ValueError("decisions tasks take --reflector PATH|none, not --checkpoint")
    reflector = args.reflector or (str(REFLECTOR_DIR) if is_shipped() else "none")
    if reflector != "none" and not Path(reflector).is_dir():
        raise ValueError(f"--reflector {reflector}: no such folder (a LoRA adapter or model folder, or none)")
    args.checkpoint = None if reflector == "none" else reflector


def _curriculum_problems(args) -> list:
    """--n problems of each Countdown level in --curriculum, easiest (fewest numbers) first."""
    if args.action != "train":
        raise ValueError("--curriculum is for train")
    try:
        levels = sorted(int(level) for level in args.curriculum.split(","))
    except ValueError:
        raise ValueError(f"--curriculum takes Countdown levels like 2,3,4, not {args.curriculum!r}") from None
    args.task = "countdown:" + "+".join(map(str, levels))
    return [p for level in levels for p in load_task(f"countdown:{level}", args.split, args.n, args.seed)]


def _in_curriculum_order(rows: list[dict], problems: list, seed: int) -> list[dict]:
    """Training rows level by level, in the order of `problems`, shuffled within each level only."""
    level = {p.id: p.task for p in problems}
    order = list(dict.fromkeys(p.task for p in problems))
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return sorted(rows, key=lambda row: order.index(level[row["problem_id"]]))


def _grpo_config(path: str | None) -> dict:
    """--grpo-config FILE.yaml: a mapping of ReflectionGRPOConfig fields (TRL's GRPOConfig and a few more),
    each value checked against its field's type (read before anything runs; `_train` builds the config
    from it and the flags with HfArgumentParser.parse_dict)."""
    if path is None:
        return {}
    try:
        options = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise ValueError(f"--grpo-config: cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"--grpo-config {path}: not YAML: {error}") from None
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ValueError(f"--grpo-config {path}: expected a YAML mapping of ReflectionGRPOConfig fields")
    return typed_fields(ReflectionGRPOConfig, options, lambda key: f"--grpo-config {path}: {key}")


def _act(args, problems, store, console, out: Path | None) -> int:
    if args.action == "run":
        results, run_id, wall = _episodes(args, _chat_model(args), problems, store, args.llm)
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

    if args.action == "eval":
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
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            console.print(f"wrote {out / 'summary.json'}")
        else:
            console.print_json(json.dumps(summary))
        return 0

    return _train(args, problems, console, out)


def _train(args, problems, console, out: Path | None) -> int:
    if args.strategy == "retry":
        console.print(
            "[red]error:[/] strategy 'retry' has no reflection to train; use reflect or reflect_attempt"
        )
        return 2
    out = out or Path("runs/reflect-grpo")
    options = dict(args.grpo_extra)  # --grpo-config wins over the flags that set the same field
    if args.curriculum:
        options.setdefault("shuffle_dataset", False)  # the rows come level by level
    try:  # before the slow part: TRL's own checks (batch sizes, groups) say what is wrong at once
        (config,) = HfArgumentParser(ReflectionGRPOConfig).parse_dict({
            "model": args.model or str(cache_dir()), "output_dir": str(out), "max_steps": args.steps,
            "num_generations": args.group_size, "prompts_per_step": args.prompts_per_step, "beta": args.beta,
            "learning_rate": args.lr, "max_completion_length": args.reflection_tokens,
            "max_retry_tokens": args.retry_tokens,
            "save_steps": args.save_steps, "seed": args.seed, "use_cpu": DEVICE_USE_CPU[args.device],
            "temperature": args.temperature, "lora_r": args.lora_r, **options,
        })  # the GRPO flags into its config # fmt: skip
    except (TypeError, ValueError) as error:
        console.print(f"[red]error:[/] GRPO options: {error}")
        return 2
    if args.model is None:
        load_embedded_model()  # converts the GGUF once, so that cache_dir() holds a model folder
    model = config.model
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    console.print(
        f"mining failed first attempts of {len(problems)} x {args.task} ({args.split}) with {model}"
    )
    rows = mine_failures(_embedded_chat(args.model, args.max_tokens), problems, progress=True)
    console.print(f"{len(rows)} failures of {len(problems)} first attempts: the training set")
    if not rows:
        console.print("[yellow]nothing to train on: every first attempt passed[/]")
        return 1
    if args.curriculum:
        rows = _in_curriculum_order(rows, problems, args.seed)
    rollout, engine = args.rollout, None
    if rollout == "engine":
        engine = LocalEngine
    console.print(
        f"GRPO: {args.steps} steps x {args.prompts_per_step} failure(s) x {args.group_size} reflections, "
        f"rollouts by {rollout}, {'LoRA r=' + str(args.lora_r) if args.lora_r else 'every weight'}"
    )
    result = train(
        config,
        rows,
        reflection_reward(problems, args.strategy),
        resume=not args.no_resume,
        engine_factory=engine,
    )
    log = [entry for entry in result["log_history"] if "reward" in entry]
    summary = {
        "task": args.task, "call_mode": args.call_mode, "n_problems": len(problems), "n_failures": len(rows), "steps": args.steps,
        "rollout": rollout, "curriculum": args.curriculum,
        "wall_s": time.perf_counter() - started, "final_model": result["final_model"],
        "resumed_from": result["resumed_from"], "config": config.to_dict(),
        "reward_per_step": [entry["reward"] for entry in log], "train_metrics": result["metrics"],
    }  # summary.json's fields # fmt: skip
    zero_std = [entry.get("frac_reward_zero_std", 0.0) for entry in log]
    summary["frac_reward_zero_std"] = sum(zero_std) / len(zero_std) if zero_std else None
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if log:
        plot_grpo(result["log_history"], out / "reward.png", f"GRPO on reflections: {args.task}")
    console.print(
        f"trained {args.steps} steps in {summary['wall_s']:.0f} s; policy in {result['final_model']}; "
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
