"""Fuzz the control server's OpenAPI with schemathesis against one live tiny run, then check the run.

    .venv/bin/python -m selfsteer.evals.bench.fuzz_api --cases 5000

One run of the `tiny` recipe trains (until this script stops it) behind the real uvicorn server on loopback,
with a bearer token that needs percent-encoding in a URL (`/`, `+`, `=`). schemathesis (its CLI, every
phase: coverage, fuzzing, stateful; every check) runs against the served /openapi.json:
1. with the token, again and again with new seeds until at least --cases test cases have run: every
   route, the history routes under /api/runs, commands typed per command type (the OpenAPI's request body
   has one variant per registered type, the args model of /api/command-types);
2. without the token: every route must answer 401, as its OpenAPI says.
The hooks in `selfsteer.evals.bench.fuzz_hooks` keep `stop` out (it would end the run) and give each idempotency
key one body. Then the run itself:
- alive: still `running`, and it goes on training once resumed;
- no NaN or infinite training loss, gradient norm or eval loss logged while it was fuzzed;
- an evaluation after the fuzz gives a finite eval loss;
- its optimizer settings and clipping norm inside the bounds of the command models.
"harmful commands applied" is the number of those that fail: a command the API accepted broke the run.

Prints cases run, 5xx responses, response-schema violations, other check failures and harmful commands
applied; exits 1 unless every one is 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from pydantic import ValidationError

from selfsteer.trainer_bridge.client import BridgeClient
from selfsteer.trainer_bridge.commands import SetMaxGradNormArgs, SetOptimizerArgs
from selfsteer.trainer_bridge.recipe import load_recipe
from selfsteer.trainer_bridge.runner import BackgroundRun
from selfsteer.trainer_bridge.store import Store

HOOKS = "selfsteer.evals.bench.fuzz_hooks"
# Long enough for any fuzz here (about 10 steps a second). Not 1e9: set_optimizer(lr) looks at the lr of
# every step left (handlers.set_optimizer, its peak_lr), and at 1e9 steps that list took 23 GB.
RUN_OVERRIDES = ["training.max_steps=200000", "training.eval_steps=100"]
WATCHED = ("loss", "grad_norm", "eval_loss")  # a harmful command shows in these first


@dataclass
class Report:
    """What one or more schemathesis runs found: counted by the hooks (every response, every failed check),
    errors from schemathesis's own JSON report."""

    cases: int = 0  # test cases that got a response
    server_errors: int = 0  # responses with a 5xx status
    failures: Counter = field(default_factory=Counter)  # failed checks by failure class
    errors: list[str] = field(default_factory=list)  # what stopped schemathesis (a crash, a dead server)
    statuses: Counter = field(default_factory=Counter)
    generated: int = 0  # schemathesis's own count of the test cases it generated

    @property
    def schema_violations(self) -> int:
        return self.failures["JsonSchemaError"]  # ST108 "Response violates schema"

    def add(self, other: Report) -> None:
        self.cases += other.cases
        self.server_errors += other.server_errors
        self.failures += other.failures
        self.errors += other.errors
        self.statuses += other.statuses
        self.generated += other.generated


def read_report(log: Path, summary: Path) -> Report:
    report = Report()
    for line in log.read_text().splitlines() if log.exists() else []:
        record = json.loads(line)
        if "failure" not in record:
            report.cases += 1
            report.statuses[record["status"]] += 1
            report.server_errors += record["status"] >= 500
        else:
            report.failures[record["failure"]] += 1
    document = json.loads(summary.read_text())
    report.generated = document["test_cases"]["generated"]
    report.errors = [f"{error['title']} ({error['count']})" for error in document["errors"]]
    return report


def schemathesis(
    schema: str,
    workdir: Path,
    *,
    url: str | None = None,
    token: str | None = None,
    max_examples: int,
    max_time: float | None,
    seed: int,
) -> Report:
    """One `schemathesis run`, its findings read back. It exits 1 on any failed check: the report says
    which, so the exit status is not needed."""
    name = f"schemathesis-{seed}-{'token' if token else 'no-token'}"
    log, summary = workdir / f"{name}.log", workdir / f"{name}.json"
    command = [sys.executable, "-m", "schemathesis.cli", "run", schema, "--checks", "all"]
    command += ["--max-examples", str(max_examples), "--seed", str(seed), "--workers", "1"]
    command += ["--generation-database", "none", "--no-color", "--report", "json"]
    command += ["--report-json-path", str(summary)]
    if url is not None:
        command += ["--url", url]
    if token is not None:
        command += ["--header", f"Authorization: Bearer {token}"]
    if max_time is not None:
        command += ["--max-time", str(max(1, int(max_time)))]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": HOOKS, "SELFSTEER_FUZZ_LOG": str(log)}
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    (workdir / f"{name}.out").write_text(done.stdout + done.stderr)
    if not summary.exists():
        return Report(
            errors=[f"schemathesis exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}"]
        )
    return read_report(log, summary)


@dataclass
class Result:
    with_token: Report
    without_token: Report
    harm: dict[str, int]
    warnings: int  # warning events on the WebSocket while the run was fuzzed
    steps: int  # optimizer steps the run took meanwhile
    wall_s: float

    @property
    def harmful(self) -> int:
        return sum(self.harm.values())

    @property
    def clean(self) -> bool:
        reports = (self.with_token, self.without_token)
        return self.harmful == 0 and not any(r.server_errors or r.failures or r.errors for r in reports)

    def lines(self) -> list[str]:
        both = Report()
        both.add(self.with_token)
        both.add(self.without_token)
        failures = ", ".join(f"{name} {n}" for name, n in sorted(both.failures.items())) or "none"
        harm = ", ".join(f"{name} {n}" for name, n in self.harm.items() if n) or "none"
        return [
            f"cases run:                   {both.cases} ({self.with_token.cases} with the token, "
            f"{self.without_token.cases} without; schemathesis generated {both.generated})",
            f"5xx responses:               {both.server_errors}",
            f"response-schema violations:  {both.schema_violations}",
            f"other check failures:        {sum(both.failures.values()) - both.schema_violations} ({failures})",
            f"schemathesis errors:         {len(both.errors)}",
            f"harmful commands applied:    {self.harmful} ({harm})",
            f"statuses with the token:     {dict(sorted(self.with_token.statuses.items()))}",
            f"statuses without the token:  {dict(sorted(self.without_token.statuses.items()))}",
            f"warning events:              {self.warnings}",
            f"the run:                     {self.steps} steps while fuzzed, {self.wall_s:.0f} s wall",
        ]


def harm_done(live, fuzz_started: float) -> dict[str, int]:
    """What the fuzz did to the run (each 0 when nothing): see the module's docstring."""
    client = live.client
    state = client.state()
    if state["paused"]:
        client.wait(client.resume()["uuid"])
    step = client.state()["step"]
    deadline = time.monotonic() + 120
    while client.state()["step"] < step + 10 and time.monotonic() < deadline:
        time.sleep(0.2)
    state = client.state()
    evaluation = client.wait(client.evaluate()["uuid"], timeout=120)
    eval_loss = (evaluation.get("result") or {}).get("eval_loss")

    with Store(live.db) as store:
        rows = store.get_metrics(live.run.run_id, names=list(WATCHED))
    broken = [row for row in rows if row["time"] >= fuzz_started and not math.isfinite(row["value"])]

    optimizer = state.get("optimizer") or {}
    settings = {name: optimizer.get(name) for name in ("lr", "weight_decay", "betas", "eps", "momentum")}
    out_of_bounds = 0
    for name, value in settings.items():
        if value is None:  # this optimizer has none (AdamW: momentum)
            continue
        with contextlib.suppress(ValidationError):
            SetOptimizerArgs.model_validate({name: tuple(value) if name == "betas" else value})
            continue
        out_of_bounds += 1
    try:
        SetMaxGradNormArgs.model_validate({"value": state["max_grad_norm"]})
    except ValidationError:
        out_of_bounds += 1
    return {
        "run not running": int(state["phase"] not in ("running", "paused")),
        "run stalled": int(state["step"] < step + 10),
        "NaN/inf logged": len(broken),
        "eval loss not finite": int(not (isinstance(eval_loss, float) and math.isfinite(eval_loss))),
        "settings out of bounds": out_of_bounds,
    }


def count_warnings(url: str, token: str, seen: list, stop: threading.Event) -> None:
    """Appends to `seen` every warning event of the run until `stop`. A subscription that ends before
    then is said on stderr: the count would otherwise read as a run that warned of nothing."""
    why = "the server closed the event stream"
    try:
        with BridgeClient(url, token=token) as client:
            for event in client.events():
                if event.get("event") == "warning":
                    seen.append(event)
                if stop.is_set():
                    return
    except Exception as error:
        why = repr(error)
    if not stop.is_set():
        print(f"fuzz_api: warning events are no longer counted ({why})", file=sys.stderr, flush=True)


def fuzz(workdir: Path, cases: int, max_time: float | None = None, seed: int = 0) -> Result:
    """Fuzzes one live tiny run: at least `cases` test cases with the token (or what `max_time` seconds
    allow, split 3:1 between the token and no token), then the run is checked. Stops the run."""
    workdir.mkdir(parents=True, exist_ok=True)
    token = f"{secrets.token_urlsafe(9)}/+={secrets.token_hex(3)}"  # percent-encoded in a query string
    start = time.perf_counter()
    recipe = load_recipe("tiny", RUN_OVERRIDES)
    with BackgroundRun(recipe, workdir / "out", db=workdir / "selfsteer.sqlite", token=token) as live:
        client = live.client
        deadline = time.monotonic() + 120
        while client.state()["step"] < 2:  # the optimizer exists: the OpenAPI fits it
            if time.monotonic() > deadline:
                raise TimeoutError("the run did not start training")
            time.sleep(0.1)
        schema = httpx.get(f"{live.run.url}/openapi.json", headers={"Authorization": f"Bearer {token}"})
        schema.raise_for_status()
        (workdir / "openapi.json").write_text(schema.text)
        operations = sum(len(methods) for methods in schema.json()["paths"].values())

        warnings: list[dict] = []
        stop = threading.Event()
        listener = threading.Thread(
            target=count_warnings, args=(live.run.url, token, warnings, stop), daemon=True
        )
        listener.start()
        fuzz_started, first_step = time.time(), client.state()["step"]
        with_token = Report()
        rounds = 0
        while with_token.cases < cases:
            left = None if max_time is None else max_time * 0.75 - (time.perf_counter() - start)
            if left is not None and left < 5:
                break
            per_operation = max(1, -(-(cases - with_token.cases) // operations))
            with_token.add(
                schemathesis(
                    f"{live.run.url}/openapi.json",
                    workdir,
                    token=token,
                    max_examples=per_operation,
                    max_time=left,
                    seed=seed + rounds,
                )
            )
            rounds += 1
            if with_token.errors or client.state()["phase"] not in ("running", "paused"):
                break  # a dead server or run: more rounds would only say so again
        left = None if max_time is None else max(5.0, max_time - (time.perf_counter() - start))
        without_token = schemathesis(
            str(workdir / "openapi.json"),
            workdir,
            url=live.run.url,
            max_examples=max(1, cases // (operations * 10)),
            max_time=left,
            seed=seed,
        )
        harm = harm_done(live, fuzz_started)
        steps = client.state()["step"] - first_step
        stop.set()
        client.stop()
        live.join(timeout=120)
    return Result(with_token, without_token, harm, len(warnings), steps, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selfsteer.evals.bench.fuzz_api",
        description=__doc__.split("\n\n")[0],
        epilog="Figures: cases run, 5xx responses, response-schema violations, other check failures and "
        "harmful commands applied (all must be 0; exit status 1 otherwise). The reports stay in --out.",
    )
    parser.add_argument(
        "--cases", type=int, default=5000, help="test cases to run with the token (default 5000)"
    )
    parser.add_argument("--max-time", type=float, default=None, help="stop after about this many seconds")
    parser.add_argument(
        "--seed", type=int, default=0, help="schemathesis seed of the first round (default 0)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where the run and reports go (default: a temp dir)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # the run shares the machine with the server and the fuzzer
    with contextlib.ExitStack() as stack:
        out = args.out or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-api-")))
        result = fuzz(out, args.cases, args.max_time, args.seed)
        for line in result.lines():
            print(line)
    return 0 if result.clean else 1


if __name__ == "__main__":
    sys.exit(main())
