"""`selfsteer demo`: ask the model for one decision, print it and store it."""

from __future__ import annotations

import argparse
import time

from rich.console import Console

from selfsteer.agents.chat_models import describe_llm_error
from selfsteer.agents.decision import LRDecision, keep_decision
from selfsteer.cli.commands.common import chat_model_from_args
from selfsteer.cli.demo import DIVERGING_HISTORY, SYSTEM_PROMPT
from selfsteer.trainer_bridge.records import NewDecision
from selfsteer.trainer_bridge.store import DEFAULT_DB_PATH, Store


def observation_text(lr: float) -> str:
    lines = [f"Current learning rate: {lr:g}.", "step | train loss | eval loss"]
    lines += [f"{step} | {train:.2f} | {evaluation:.2f}" for step, train, evaluation in DIVERGING_HISTORY]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    console = Console()
    observation = observation_text(args.lr)
    console.print(f"[bold]What the supervisor sees[/]\n{observation}\n")
    try:
        model = chat_model_from_args(args)
        decide = model.with_structured_output(LRDecision, include_raw=True, fallback=keep_decision)
        with console.status(f"asking {args.llm} ..."):
            decide.invoke([("system", SYSTEM_PROMPT), ("user", observation)])  # warm-up: loads the model
            started = time.perf_counter()
            answer = decide.invoke([("system", SYSTEM_PROMPT), ("user", observation)])
            latency = time.perf_counter() - started
    except Exception as error:  # the one line a person needs, not a traceback
        console.print(f"[red]error:[/] {describe_llm_error(error, args.llm, args.base_url)}")
        return 1
    if isinstance(answer, LRDecision):  # an OpenAI model's own structured output has no raw/fallback here
        answer = {"parsed": answer, "raw": None, "parsing_error": None}
    decision: LRDecision = answer["parsed"] or keep_decision(answer["parsing_error"])
    fell_back = answer["parsing_error"] is not None
    new_lr = {"double": args.lr * 2, "halve": args.lr / 2, "keep": args.lr}[decision.action]
    console.print(
        f"[bold]Decision[/] ({latency:.2f} s{', fallback' if fell_back else ''}): {decision.action} "
        f"-> learning rate {new_lr:g}\n[bold]Explanation[/]: {decision.explanation}"
    )

    with Store(args.db or DEFAULT_DB_PATH) as store:
        run_id = store.create_run("demo-decision", kind="demo", config={"llm": args.llm, "lr": args.lr})
        store.add_decision(run_id, NewDecision(
            step=DIVERGING_HISTORY[-1][0], agent="llm", action=decision.action,
            explanation=decision.explanation, model=args.llm, strategy="demo",
            observation={"text": observation}, raw_output=answer["raw"].content if answer["raw"] else None,
            lr_before=args.lr, lr_after=new_lr, latency_s=latency, fallback=fell_back,
        ))  # the demo's one decision, field by field # fmt: skip
        store.finish_run(run_id, summary={"action": decision.action, "latency_s": latency})
    console.print(f"stored as run {run_id} in {args.db or DEFAULT_DB_PATH}")
    return 0
