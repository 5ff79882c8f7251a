"""`selfsteer reflect run|train|eval`: the self-correction loop (Reflect, Retry, Reward).

selfsteer reflect run   --task countdown --n 8                  # episodes, printed and stored
selfsteer reflect eval  --task bfcl:simple_python --n 100 --out runs/eval   # writes summary.json
selfsteer reflect eval  --task bfcl:multiple --call-mode text --llm openai:gpt-4o-mini --out runs/text
selfsteer reflect train --task countdown --n 64 --steps 20 --out runs/grpo  # GRPO on reflections
selfsteer reflect eval  --task countdown --checkpoint runs/grpo/final --out runs/after

# a supervisor's own lr decisions (counterfactual rows from `selfsteer decisions collect --out DIR`):
selfsteer reflect eval  --task decisions:DIR --reflector none --compare --out runs/decisions-untrained
selfsteer reflect train --task decisions:DIR --lora-r 8 --lr 5e-5 --steps 60 --out runs/reflector
selfsteer reflect eval  --task decisions:DIR --reflector runs/reflector/adapter --out runs/decisions-trained
"""

from __future__ import annotations

import argparse

from selfsteer.cli.common import add_llm_arguments
from selfsteer.prompts import REFLECT_STRATEGIES
from selfsteer.tools.tasks import CALL_MODES

ACTIONS = ("run", "train", "eval")
REFLECTOR_NAME = "agents/reflector/"
DEVICE_USE_CPU = {"auto": None, "cpu": True, "cuda": False}  # --device as ReflectionGRPOConfig.use_cpu


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="the self-correction loop: run episodes, evaluate, or train reflections with GRPO",
        description="Reflect, Retry, Reward. `run` plays episodes (attempt, validate, reflect, retry) and "
        "stores them; `eval` adds first-try and second-try accuracy with 95% intervals (Wilson; a paired bootstrap for the gain) and the "
        "mean reflection length, written to OUT/summary.json; `train` mines failed first attempts and "
        "trains the local model with GRPO so that its reflections make the retry pass.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument(
        "--task",
        default="countdown",
        help="countdown, bfcl:CATEGORY, decisions:DIR (a supervisor's lr decisions over the counterfactual "
        "rows in DIR: its decision is the first try, a frozen actor retries) or module:function",
    )
    parser.add_argument(
        "--call-mode",
        choices=CALL_MODES,
        default="tools",
        help="bfcl: how the model calls functions. tools (default): the functions are offered as OpenAI-style "
        "tools and the model answers with tool calls (the leaderboard's FC mode; needs a chat model that "
        "calls tools); text: the functions are listed in the prompt and the calls read from the answer's "
        "text. Ignored by tasks without call modes (countdown). train needs text",
    )
    parser.add_argument("--n", type=int, default=32, help="problems (default 32)")
    parser.add_argument("--split", choices=("train", "test"), help="default: train for train, else test")
    parser.add_argument(
        "--out", default=None, help="output folder (summary.json, episodes.jsonl, checkpoints)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--strategy",
        default="reflect_attempt",
        choices=REFLECT_STRATEGIES,
        help="retry: no reflection; reflect: retry with the reflection only; reflect_attempt (default): "
        "with the failed attempt and the reflection; memory: plus rewarded reflections of earlier episodes",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="eval: also evaluate every other strategy on the same problems (summary.json 'strategies')",
    )
    parser.add_argument(
        "--max-retries", type=int, default=1, help="retries after the first attempt (default 1)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=96, help="tokens per answer or reflection (default 96)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="episodes at once (default 32)")
    parser.add_argument("--db", default=None, help="store file (default ./selfsteer.sqlite)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    decisions = parser.add_argument_group("decisions:DIR tasks")
    decisions.add_argument(
        "--policy",
        default=None,
        help="the supervisor whose decisions are the first tries: intervener (default, the shipped one), "
        "keep, rule, hypergradient, ... or module:Class (cached in DIR/first-tries/)",
    )
    decisions.add_argument(
        "--reflector",
        default=None,
        metavar="PATH|none",
        help="who writes the reflections: a trained reflector (a LoRA adapter folder, e.g. OUT/adapter of "
        "`reflect train`, or a model folder), or none: the untrained embedded model. Default: the shipped "
        f"reflector ({REFLECTOR_NAME}) where there is one, else none. eval also runs the untrained model "
        "as the baseline unless --no-baseline",
    )
    local = parser.add_argument_group("local model (eval --checkpoint, train)")
    local.add_argument("--checkpoint", default=None, help="eval: a trained policy folder (e.g. OUT/final)")
    local.add_argument(
        "--no-baseline", action="store_true", help="eval --checkpoint: skip the untrained model"
    )
    local.add_argument("--model", default=None, help="train: model folder (default: the embedded model)")
    grpo = parser.add_argument_group("GRPO (train)")
    grpo.add_argument("--steps", type=int, default=20)
    grpo.add_argument("--group-size", type=int, default=4, help="reflections per failed attempt")
    grpo.add_argument("--prompts-per-step", type=int, default=1)
    grpo.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0: no reference model)")
    grpo.add_argument("--lr", type=float, default=1e-6)
    grpo.add_argument("--reflection-tokens", type=int, default=64)
    grpo.add_argument("--retry-tokens", type=int, default=64)
    grpo.add_argument("--save-steps", type=int, default=10)
    grpo.add_argument("--device", default="auto", choices=tuple(DEVICE_USE_CPU))
    grpo.add_argument(
        "--rollout",
        default="trl",
        choices=("trl", "engine"),
        help="how reflections and retries are decoded: trl (default: TRL's model.generate, or vLLM on a GPU "
        "where installed) or engine (the embedded model's batched engine around the model being trained; "
        "measured no faster on a 2-core CPU at 4 reflections per group, see evals/bench/grpo.py)",
    )
    grpo.add_argument(
        "--lora-r", type=int, default=0, help="train a LoRA adapter of this rank instead of every weight (0)"
    )
    grpo.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of reflections")
    grpo.add_argument(
        "--curriculum",
        default=None,
        metavar="LEVELS",
        help="countdown: train level by level, easiest first, e.g. 2,3,4 (--n problems of each level; "
        "--task is then ignored)",
    )
    grpo.add_argument(
        "--grpo-config",
        default=None,
        metavar="FILE.yaml",
        help="any other fields of ReflectionGRPOConfig (selfsteer.graphs.grpo_reflection: TRL's GRPOConfig "
        "and TrainingArguments, plus this project's), as a YAML mapping, e.g. `scale_rewards: none` and "
        "`loss_type: dr_grpo`; its keys win over the flags that set the same field; unknown keys are refused",
    )
    grpo.add_argument("--no-resume", action="store_true", help="start afresh even if OUT has checkpoints")
    add_llm_arguments(parser)
