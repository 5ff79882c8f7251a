"""Benchmark of the embedded model on this machine's CPU.

    .venv/bin/python -m selfsteer.evals.bench.llm [--decisions 20] [--rounds 3] [--tokens 32]
    .venv/bin/python -m selfsteer.evals.bench.llm --intervener [DIR] [--decisions 20]
    .venv/bin/python -m selfsteer.evals.bench.llm --tools [--decisions 5]

Prints:
- load time of the cached model (after `import transformers`);
- median latency of a three-way structured decision (double / halve / keep) over varied loss
  histories, and of the full decision with its explanation;
- generation throughput of a batch of 16 prompts against the same 16 prompts one at a time, as the
  median of paired rounds (the same process, the same prompts, greedy).

With --intervener: the intervener's full decision (action and explanation) on observations of real tiny
runs (one per evaluation, starts from far too low to far too high), in this process and through
`selfsteer serve-llm --adapter` with LangChain's ChatOpenAI, with template explanations (the default: the
model scores the action) and with the model's own; median latency (target <= 1 s) and how many
explanations cite only numbers of the prompt.

With --tools: median latency of one tool call (tool_choice "required", two tools offered, greedy), in
this process (`LocalChatModel.bind_tools`) and through serve-llm over loopback HTTP (`ChatOpenAI`).
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import subprocess
import sys
import time

import torch
import transformers  # noqa: F401  (imported before the clock starts: its import is not the load)
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from selfsteer.agents.chat_models import make_chat_model
from selfsteer.agents.decision import LRDecision
from selfsteer.agents.intervener import ADAPTER_DIR, IntervenerSupervisor, model_explanation
from selfsteer.agents.intervener_data import grounded, observation_of
from selfsteer.agents.llm.chat import LocalChatModel
from selfsteer.agents.llm.engine import LocalEngine
from selfsteer.agents.llm.local_engines import get_local_engine
from selfsteer.agents.llm.openai_server import create_app
from selfsteer.agents.llm.weights import load_embedded_model
from selfsteer.evals.counterfactual import RunSpec, collect_run
from selfsteer.trainer_bridge.net import serving
from selfsteer.trainer_bridge.records import Action as ActionName

SYSTEM = (
    "You supervise the training of a language model. Every few steps you see its losses and decide "
    "whether to double, halve or keep the learning rate."
)


class Action(BaseModel):
    action: ActionName


def observation(rng: random.Random) -> str:
    lr = rng.choice([1e-4, 1e-3, 5e-3, 2e-2])
    loss = rng.uniform(2.0, 4.5)
    rows = []
    for step in range(50, 300, 50):
        loss *= rng.uniform(0.85, 1.2)
        rows.append(f"{step} | {loss:.2f}")
    return f"Current learning rate: {lr:g}.\nstep | eval loss\n" + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=20, help="decisions to time (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="paired batch/sequential rounds (default 3)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per prompt (default 32)")
    parser.add_argument(
        "--intervener",
        nargs="?",
        const="shipped",
        default=None,
        metavar="DIR",
        help="time the intervener instead (the shipped adapter, or DIR)",
    )
    parser.add_argument("--tools", action="store_true", help="time one tool call instead")
    args = parser.parse_args()
    if args.tools:
        bench_tools(args.decisions)
        return
    if args.intervener is not None:
        bench_intervener(args.intervener, args.decisions)
        return

    load_embedded_model()  # converts on the very first run; the timed load below is from the cache
    started = time.perf_counter()
    model, tokenizer = load_embedded_model()
    load_s = time.perf_counter() - started
    chat = LocalChatModel()
    chat._engine = LocalEngine(model, tokenizer)
    print(f"machine: {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"load from cache:                       {load_s:.2f} s")

    rng = random.Random(0)
    decide = chat.with_structured_output(Action)
    decide.invoke([("system", SYSTEM), ("user", observation(rng))])  # warm-up
    latencies = []
    for _ in range(args.decisions):
        messages = [("system", SYSTEM), ("user", observation(rng))]
        started = time.perf_counter()
        decide.invoke(messages)
        latencies.append(time.perf_counter() - started)
    print(
        f"three-way decision, median of {args.decisions}:  {statistics.median(latencies):.3f} s "
        f"(min {min(latencies):.3f}, max {max(latencies):.3f}; target < 0.3 s)"
    )
    explained = chat.with_structured_output(LRDecision)
    full = []
    for _ in range(max(3, args.decisions // 4)):
        messages = [("system", SYSTEM), ("user", observation(rng))]
        started = time.perf_counter()
        explained.invoke(messages)
        full.append(time.perf_counter() - started)
    print(f"decision with explanation, median of {len(full)}: {statistics.median(full):.3f} s")

    engine = chat.engine
    prompts = [
        engine.chat_prompt_ids([{"role": "user", "content": f"Write a short note about topic {i}."}])
        for i in range(16)
    ]
    ratios, batch_rates, single_rates = [], [], []
    for _ in range(args.rounds):
        started = time.perf_counter()
        batched = engine.generate_many(prompts, max_new_tokens=args.tokens)
        batch_s = time.perf_counter() - started
        started = time.perf_counter()
        singles = [engine.generate(p, max_new_tokens=args.tokens) for p in prompts]
        single_s = time.perf_counter() - started
        batch_rates.append(sum(len(g.token_ids) for g in batched) / batch_s)
        single_rates.append(sum(len(g.token_ids) for g in singles) / single_s)
        ratios.append(batch_rates[-1] / single_rates[-1])
    print(
        f"16 prompts x {args.tokens} tokens: batched {statistics.median(batch_rates):.0f} tok/s, "
        f"one at a time {statistics.median(single_rates):.0f} tok/s"
    )
    print(
        f"batch throughput ratio, median of {args.rounds} paired rounds: {statistics.median(ratios):.1f}x "
        f"(each: {', '.join(f'{r:.1f}' for r in ratios)}; target >= 4x)"
    )
    engine.close()


def observations(count: int) -> list:
    """Observations of real tiny runs at each evaluation, from far too low to far too high starts."""
    seen = []
    for lr in (1.5625e-4, 1e-2, 0.64, 1.25e-3, 0.08):
        rows = []
        collect_run(RunSpec(shape="tiny", lr=lr, policy="random", seed=7), on_row=rows.append)
        seen += rows
    return [observation_of(row) for row in seen[:count]]


def bench_tools(repeats: int) -> None:
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return ""

    def get_time(timezone: str) -> str:
        """Get the current time in a timezone."""
        return ""

    cities = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Dakar"]
    questions = [f"What is the weather in {cities[i % len(cities)]}?" for i in range(repeats)]

    def timed(model) -> tuple[float, list]:
        bound = model.bind_tools([get_weather, get_time], tool_choice="required")
        bound.invoke("What is the weather in Rome?")  # warm-up: load, grammar compiled
        latencies, names = [], []
        for question in questions:
            started = time.perf_counter()
            answer = bound.invoke(question)
            latencies.append(time.perf_counter() - started)
            names += [c["name"] for c in answer.tool_calls]
        return statistics.median(latencies), names

    print(f"machine: {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    local, names = timed(LocalChatModel(max_new_tokens=64))
    print(f"one tool call (required, 2 tools), in process, median of {repeats}:  {local:.2f} s  {names}")
    with serving(create_app(get_local_engine())) as url:
        remote, names = timed(
            ChatOpenAI(base_url=f"{url}/v1", api_key="none", model="smollm2", max_tokens=64)
        )
    print(f"one tool call (required, 2 tools), serve-llm HTTP, median of {repeats}: {remote:.2f} s  {names}")


def bench_intervener(adapter: str, decisions: int) -> None:
    adapter = ADAPTER_DIR if adapter == "shipped" else adapter
    seen = observations(decisions)
    local = {}
    for explanations in ("template", "model"):
        supervisor = IntervenerSupervisor(adapter, explanations=explanations)
        supervisor.decide(seen[0])  # warm-up: loads the model
        where = f"in process, {explanations} explanations"
        local[explanations] = report(supervisor, seen, where, grounded, model_explanation)

    server = subprocess.Popen(
        [sys.executable, "-m", "selfsteer.cli.main", "serve-llm", "--port", "0", "--adapter", str(adapter)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = next(m.group(1) for line in server.stdout if (m := re.search(r"(http://\S+/v1)", line)))
        for explanations in ("template", "model"):
            remote = IntervenerSupervisor(
                explanations=explanations, chat_model=make_chat_model("openai:intervener", base_url=url)
            )
            remote.decide(seen[0])
            where = f"through serve-llm (ChatOpenAI), {explanations} explanations"
            served = report(remote, seen, where, grounded, model_explanation)
            same = sum(a == b for a, b in zip(served, local[explanations], strict=True))
            print(f"  the same action as in process: {same}/{len(seen)}")
    finally:
        server.terminate()
        server.wait(30)


def report(supervisor, seen: list, where: str, grounded, model_explanation) -> list[str]:
    latencies, cited, actions = [], 0, []
    for observation in seen:
        decision = supervisor.decide(observation)
        latencies.append(decision.latency_s)
        actions.append(decision.action)
        prompt = supervisor.messages(observation)[-1][1]
        cited += grounded(model_explanation(decision) or decision.explanation, prompt)
    print(
        f"intervener decision {where}, median of {len(seen)}: {statistics.median(latencies):.3f} s "
        f"(min {min(latencies):.3f}, max {max(latencies):.3f}; target <= 1 s); explanations citing only "
        f"numbers of the prompt: {cited}/{len(seen)}; actions {dict((a, actions.count(a)) for a in set(actions))}"
    )
    print(f"  last: {decision.action}: {model_explanation(decision) or decision.explanation!r}")
    return actions


if __name__ == "__main__":
    main()
