"""`selfsteer reflect run|train|eval`: the self-correction loop (Reflect, Retry, Reward).

selfsteer reflect run   --task countdown --n 8                  # episodes, printed and stored
selfsteer reflect eval  --task bfcl:simple_python --n 100 --out runs/eval   # writes summary.json
selfsteer reflect eval  --task bfcl:multiple --call-mode text --llm openai:gpt-4o-mini --out runs/text
selfsteer reflect train --task countdown --n 64 --max_steps 20 --output_dir runs/grpo  # GRPO on reflections
selfsteer reflect train --config grpo.yaml --learning_rate 5e-6   # the YAML's fields, the flags over them
selfsteer reflect eval  --task countdown --checkpoint runs/grpo/final --out runs/after

# a supervisor's own lr decisions (counterfactual rows from `selfsteer decisions collect --out DIR`):
selfsteer reflect eval  --task decisions:DIR --reflector none --compare --out runs/decisions-untrained
selfsteer reflect train --task decisions:DIR --lora_r 8 --learning_rate 5e-5 --max_steps 60 --output_dir runs/reflector
selfsteer reflect eval  --task decisions:DIR --reflector runs/reflector/adapter --out runs/decisions-trained
"""

from __future__ import annotations

import argparse

from selfsteer.cli.common import add_config_command, add_llm_arguments
from selfsteer.prompts import REFLECT_STRATEGIES
from selfsteer.tools.tasks import CALL_MODES

REFLECTOR_NAME = "agents/reflector/"
EXAMPLES = "examples:\n" + "\n".join(f"  {line}" if line else "" for line in __doc__.split("\n")[2:])

DESCRIPTION = """\
Reflect, Retry, Reward. `run` plays episodes (attempt, validate, reflect, retry) and stores them; `eval`
adds first-try and second-try accuracy with 95% intervals (Wilson; a paired bootstrap for the gain) and
the mean reflection length, written to OUT/summary.json; `train` mines failed first attempts and trains
the local model with GRPO so that its reflections make the retry pass. `selfsteer reflect ACTION --help`
lists the flags of each (run and eval share theirs: --task, --strategy, --n, --out, ...).
"""

TRAIN_DESCRIPTION = """\
Mines the failed first attempts of --n problems of --task with the local model (--model, default the
embedded one) and trains it with GRPO (TRL's GRPOTrainer) so that its reflections make the retry pass;
checkpoints, the final policy, train_summary.json and reward.png go to --output_dir. Resumes from the
newest checkpoint in --output_dir unless --no_resume.

Every field of ReflectionGRPOConfig (selfsteer.graphs.grpo_reflection: TRL's GRPOConfig with this
project's defaults and fields) is a flag of its own name, and so is every field of the task's arguments,
parsed by TRL's TrlParser: --config FILE.yaml sets any of them (a mapping of field names, e.g.
`scale_rewards: none`, `loss_type: dr_grpo`; unknown keys are refused), and flags on the command line win
over the file. The task's arguments (listed last): --task, --n, --split, --call_mode, --strategy,
--max_tokens, --policy, --curriculum, --rollout, --retry_temperature, --retry_samples, --feedback,
--no_resume, --threads. ReflectionGRPOConfig's own:
--model, --prompts_per_step, --max_retry_tokens, --lora_r, --refill_attempts, --skip_zero_advantage; and
GRPOConfig's, with this project's defaults: --output_dir, --max_steps, --num_generations, --learning_rate,
--beta, --temperature, --max_completion_length, --save_steps, --seed, --use_cpu, ...

The defaults are the config's own. Flags of the old command line, and their new names: --steps ->
--max_steps (default 50; it was 20), --group-size -> --num_generations, --prompts-per-step ->
--prompts_per_step, --lr -> --learning_rate, --reflection-tokens -> --max_completion_length,
--retry-tokens -> --max_retry_tokens, --save-steps -> --save_steps, --lora-r -> --lora_r, --out ->
--output_dir, --device cpu|cuda|auto -> --use_cpu true|false (unset: a GPU when there is one),
--no-resume -> --no_resume, --grpo-config FILE.yaml -> --config FILE.yaml (whose keys, unlike
--grpo-config's, give way to the flags). Dashed spellings of the new names work too (--lora-r,
--save-steps, --no-resume, --call-mode, ...); --seed, --model, --beta and --temperature keep their
names. Gone, as train never used them: --db, --llm, --base-url, --api-key, --timeout, --max-retries,
--concurrency, --reflector (train trains a reflector from --model).

examples:
  selfsteer reflect train --task countdown:2 --n 400 --max_steps 120 --num_generations 8 --output_dir runs/grpo
  selfsteer reflect train --config grpo.yaml --learning_rate 5e-6   # the YAML's fields, the flags over them
  selfsteer reflect train --curriculum 2,3,4 --n 64 --lora_r 8
"""


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="the self-correction loop: run episodes, evaluate, or train reflections with GRPO",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    actions = parser.add_subparsers(dest="action", required=True)
    episodes = _episode_arguments()
    actions.add_parser(
        "run",
        parents=[episodes],
        help="play episodes, print and store them",
        description="Plays episodes (attempt, validate, reflect, retry), prints and stores them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    # ReflectionGRPOConfig's fields and the task's, parsed by TRL's parser when it runs
    add_config_command(actions, "train", help="train reflections with GRPO (--help: every flag)")
    actions.add_parser(
        "eval",
        parents=[episodes],
        help="first-try and second-try accuracy with 95%% intervals",
        description="Plays episodes and writes first-try and second-try accuracy with 95% intervals\n"
        "(Wilson; a paired bootstrap for the gain) and the mean reflection length to OUT/summary.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )


def _episode_arguments() -> argparse.ArgumentParser:
    """The flags `run` and `eval` share."""
    parser = argparse.ArgumentParser(add_help=False)
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
        "text. Ignored by tasks without call modes (countdown)",
    )
    parser.add_argument("--n", type=int, default=32, help="problems (default 32)")
    parser.add_argument("--split", choices=("train", "test"), default="test", help="default: test")
    parser.add_argument("--out", default=None, help="output folder (summary.json, episodes.jsonl)")
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
    parser.add_argument(
        "--feedback",
        action="store_true",
        help="bfcl: the reflection and the plain retry are told which check failed (the validator's reason "
        "without the answer key's accepted values; prompts/reflect_feedback.yaml)",
    )
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
        "`reflect train`, or a model folder), or none: the untrained embedded model. decisions:DIR: default "
        f"the shipped reflector ({REFLECTOR_NAME}) where there is one, else none. bfcl: the first tries and "
        "the retries stay the untrained embedded model's (the frozen actor), only the reflections are the "
        "reflector's. eval also runs the untrained model as the baseline unless --no-baseline",
    )
    local = parser.add_argument_group("local model (eval --checkpoint)")
    local.add_argument("--checkpoint", default=None, help="eval: a trained policy folder (e.g. OUT/final)")
    local.add_argument(
        "--no-baseline", action="store_true", help="eval --checkpoint: skip the untrained model"
    )
    add_llm_arguments(parser)
    return parser
