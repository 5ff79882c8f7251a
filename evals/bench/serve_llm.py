"""Reliability figures of `selfsteer serve-llm`, measured from outside: a real server process, real
HTTP, real signals. Each scenario starts its own server (`selfsteer serve-llm --port 0`), so one
scenario's leftovers never slow the next.

    .venv/bin/python -m selfsteer.evals.bench.serve_llm [--long-tokens 400] [--scenarios all] [--threads 1]

The server runs from whatever `selfsteer` imports: to measure an older tree, run this file by its
path with PYTHONPATH pointing at a `selfsteer` package of that tree (the server inherits it).

Scenarios (each prints one line):
- alone: latency of a 4-token request on an idle server (median of 3);
- during-long: the same request sent while a long answer (--long-tokens) is being generated; its
  latency, and whether the long answer was still running when it came back;
- abandoned: a long request whose client gives up after 2 s (non-streaming, then streaming); the
  latency of the next 4-token request and the server's RSS before and after;
- structured: a json_schema answer with a long free-text field (an `explanation` of at most 800
  characters, as the supervisors' decision has) and no max_tokens: tokens, seconds, finish reason;
- cap: a request with max_tokens 100000: the status code (and message) the server answers with;
- sigterm: SIGTERM while a long answer is being generated: seconds until the process exits.

The model writes ~20 tokens/s on two CPU cores; figures on a shared machine vary from run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx

from selfsteer.trainer_bridge.records import ACTIONS

URL = re.compile(r"(http://127\.0\.0\.1:\d+/v1)")
LONG_PROMPT = "List the numbers from 1 to 1000, separated by commas."  # measured: runs on past 300 tokens
SHORT = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4}
# The supervisors' decision (LRDecision) as langchain-openai's json_schema method sends it, and an
# observation on which the untrained model loops in the free-text field.
DECISION_SCHEMA = {
    "type": "object",
    "properties": {
        "action": {"type": "string", "enum": list(ACTIONS)},
        "explanation": {"type": "string", "maxLength": 800, "description": "why, in at most 100 words"},
    },
    "required": ["action", "explanation"],
    "additionalProperties": False,
}
DECISION_MESSAGES = [
    {
        "role": "system",
        "content": "You supervise the training of a neural network. You see its recent metric history and "
        "decide whether to double, halve or keep the learning rate.",
    },
    {"role": "user", "content": "Loss: 1.000000. Learning rate: 1.000000. Gradient norm: 1.000000. Decide."},
]


@contextmanager
def server(extra: list[str] | None = None):
    """`selfsteer serve-llm --port 0` in a process of its own; yields (process, base URL)."""
    argv = [sys.executable, "-m", "selfsteer.cli.main", "serve-llm", "--port", "0", *(extra or [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    threading.Thread(target=process.stderr.read, daemon=True).start()  # never block on a full pipe
    try:
        for line in process.stdout:
            if match := URL.search(line):
                base = match.group(1)
                break
        else:
            raise RuntimeError(f"serve-llm exited with {process.wait()} before printing its URL")
        threading.Thread(target=process.stdout.read, daemon=True).start()
        yield process, base
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def short_latency(base: str, timeout: float = 900) -> float:
    started = time.perf_counter()
    response = httpx.post(f"{base}/chat/completions", json=SHORT, timeout=timeout)
    response.raise_for_status()
    return time.perf_counter() - started


def long_body(tokens: int, stream: bool = False) -> dict:
    return {
        "messages": [{"role": "user", "content": LONG_PROMPT}],
        "max_tokens": tokens,
        "stream": stream,
    }


def start_long(base: str, tokens: int) -> tuple[threading.Thread, dict]:
    """A long non-streaming request in a thread; the dict gets its end time and token count."""
    result: dict = {}

    def run():
        try:
            response = httpx.post(f"{base}/chat/completions", json=long_body(tokens), timeout=1800)
        except httpx.HTTPError as error:  # the server went away (the sigterm scenario)
            result["ended"], result["error"] = time.perf_counter(), repr(error)
            return
        result["ended"] = time.perf_counter()
        result["status"] = response.status_code
        if response.status_code == 200:
            result["tokens"] = response.json()["usage"]["completion_tokens"]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def scenario_alone(args) -> None:
    with server() as (_, base):
        short_latency(base)  # warm-up
        times = [short_latency(base) for _ in range(3)]
    print(f"alone: 4-token request {statistics.median(times):.2f} s (median of 3)", flush=True)


def scenario_during_long(args) -> None:
    with server() as (_, base):
        short_latency(base)  # warm-up
        thread, result = start_long(base, args.long_tokens)
        time.sleep(3)  # the long answer is being generated by then (its prefill takes under a second)
        latency = short_latency(base)
        short_done = time.perf_counter()
        still_running = "ended" not in result
        thread.join()
    long_after = result["ended"] - short_done
    print(
        f"during-long: 4-token request {latency:.2f} s while a {result.get('tokens')}-token answer ran; "
        f"the long one was {'still running' if still_running else 'already done'} "
        f"(it ended {long_after:+.1f} s after the short one)",
        flush=True,
    )


def scenario_abandoned(args) -> None:
    for stream in (False, True):
        with server() as (process, base):
            short_latency(base)  # warm-up
            rss_before = rss_mb(process.pid)
            started = time.perf_counter()
            try:
                with httpx.stream(
                    "POST",
                    f"{base}/chat/completions",
                    json=long_body(args.long_tokens, stream),
                    timeout=httpx.Timeout(2.0),
                ) as response:
                    for _ in response.iter_lines():
                        if time.perf_counter() - started > 2:
                            break
            except httpx.TimeoutException:
                pass
            # the client is gone (the connection is closed when the with-block or the timeout ends)
            latency = short_latency(base)
            rss_after = rss_mb(process.pid)
        kind = "streaming" if stream else "non-streaming"
        print(
            f"abandoned ({kind}, max_tokens {args.long_tokens}, client gone after 2 s): next 4-token request "
            f"{latency:.2f} s; RSS {rss_before:.0f} -> {rss_after:.0f} MB",
            flush=True,
        )


def scenario_structured(args) -> None:
    with server() as (_, base):
        short_latency(base)  # warm-up
        body = {
            "messages": DECISION_MESSAGES,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "decision", "schema": DECISION_SCHEMA},
            },
        }
        started = time.perf_counter()
        response = httpx.post(f"{base}/chat/completions", json=body, timeout=1800)
        seconds = time.perf_counter() - started
    answer = response.json()
    if response.status_code != 200:
        print(f"structured: {response.status_code} {answer}", flush=True)
        return
    content = answer["choices"][0]["message"]["content"]
    try:
        json.loads(content)
        valid = "valid JSON"
    except json.JSONDecodeError:
        valid = "NOT valid JSON"
    print(
        f"structured (explanation maxLength 800, no max_tokens): {answer['usage']['completion_tokens']} tokens "
        f"in {seconds:.1f} s, finish_reason {answer['choices'][0]['finish_reason']}, {valid}, "
        f"answer {len(content)} characters, its end: {content[-80:]!r}",
        flush=True,
    )


def scenario_cap(args) -> None:
    with server() as (_, base):
        body = {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 100000}
        try:
            response = httpx.post(f"{base}/chat/completions", json=body, timeout=10)
            what = f"{response.status_code} {response.text[:200]}"
        except httpx.TimeoutException:
            what = "accepted: still generating after 10 s (the client gave up)"
    print(f"cap: max_tokens 100000 -> {what}", flush=True)


def scenario_sigterm(args) -> None:
    with server() as (process, base):
        start_long(base, args.long_tokens)
        time.sleep(3)  # the long answer is being generated by then (its prefill takes under a second)
        sent = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=args.sigterm_wait)
            print(
                f"sigterm: exited {time.perf_counter() - sent:.1f} s after SIGTERM (exit code {code}) "
                f"while a {args.long_tokens}-token answer ran",
                flush=True,
            )
        except subprocess.TimeoutExpired:
            print(f"sigterm: still running {args.sigterm_wait:.0f} s after SIGTERM (killed)", flush=True)


THREADS = 1  # torch threads of the server (--threads)

SCENARIOS = {
    "alone": scenario_alone,
    "during-long": scenario_during_long,
    "abandoned": scenario_abandoned,
    "structured": scenario_structured,
    "cap": scenario_cap,
    "sigterm": scenario_sigterm,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--long-tokens", type=int, default=400, help="max_tokens of the long answer (default: 400)"
    )
    parser.add_argument(
        "--scenarios", default="all", help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument(
        "--sigterm-wait",
        type=float,
        default=60,
        help="seconds to wait for the exit after SIGTERM (default: 60)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the server (OMP_NUM_THREADS; default: 1, steadier on a shared 2-core machine)",
    )
    args = parser.parse_args(argv)
    global THREADS
    THREADS = args.threads
    names = list(SCENARIOS) if args.scenarios == "all" else args.scenarios.split(",")
    for name in names:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)", flush=True)
    for name in names:
        SCENARIOS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
