"""Fuzz `selfsteer serve-llm`'s OpenAPI with schemathesis, against the real server process.

    .venv/bin/python -m selfsteer.evals.bench.fuzz_serve_llm [--cases 1000] [--max-tokens 2] [--seed 0]

Starts `selfsteer serve-llm --port 0 --max-tokens N --api-key KEY` (the real embedded model; a small cap
keeps every generated answer cheap, and the OpenAPI names it as the maximum of max_tokens), then runs
`schemathesis run` on its /openapi.json with every check and every phase (examples, coverage, fuzzing,
stateful), with the key, again with new seeds until at least --cases test cases have sent a request;
then one round without the key (every operation must answer 401, as the OpenAPI says). Afterwards the
server must still answer a plain request.

Prints cases run, 5xx responses, response-schema violations and the other check failures by name, and
the statuses seen; exits 1 unless cases >= --cases and 5xx, schema violations, other failures and
schemathesis errors are all 0. The NDJSON reports stay in --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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

URL = re.compile(r"(http://127\.0\.0\.1:\d+)/v1")


@dataclass
class Report:
    """What schemathesis runs found, read from their NDJSON event reports."""

    cases: int = 0  # test cases that sent a request and got a response
    server_errors: int = 0  # responses with a 5xx status
    failures: Counter = field(default_factory=Counter)  # failed checks by name
    errors: list[str] = field(default_factory=list)  # what stopped schemathesis itself
    statuses: Counter = field(default_factory=Counter)

    @property
    def schema_violations(self) -> int:
        return self.failures["response_schema_conformance"]

    def add(self, other: Report) -> None:
        self.cases += other.cases
        self.server_errors += other.server_errors
        self.failures += other.failures
        self.errors += other.errors
        self.statuses += other.statuses


def read_report(path: Path) -> Report:
    interactions: dict[str, dict] = {}
    checks: dict[str, list[dict]] = {}
    report = Report()
    for line in path.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if finished is not None:
            recorder = finished.get("recorder", {})
            interactions.update(recorder.get("interactions", {}))
            checks.update(recorder.get("checks", {}))
        error = event.get("NonFatalError") or event.get("FatalError")
        if error is not None:
            report.errors.append(json.dumps(error)[:500])
    for interaction in interactions.values():
        response = interaction.get("response")
        if response is None:
            continue
        report.cases += 1
        report.statuses[response["status_code"]] += 1
        report.server_errors += response["status_code"] >= 500
    for results in checks.values():
        report.failures.update(check["name"] for check in results if check["status"] == "failure")
    return report


def run_schemathesis(
    root: str, workdir: Path, *, key: str | None, max_examples: int, seed: int, checks: str
) -> Report:
    """One `schemathesis run` (it exits 1 on any failed check; the report says which)."""
    name = f"schemathesis-{seed}-{'key' if key else 'no-key'}"
    ndjson = workdir / f"{name}.ndjson"
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{root}/openapi.json", "--checks", checks]
    command += ["--max-examples", str(max_examples), "--seed", str(seed), "--workers", "1"]
    command += ["--generation-database", "none", "--no-color", "--report", "ndjson"]
    command += ["--report-ndjson-path", str(ndjson), "--request-timeout", "120"]
    if key is not None:
        command += ["--header", f"Authorization: Bearer {key}"]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    (workdir / f"{name}.out").write_text(done.stdout + done.stderr)
    if not ndjson.exists():
        return Report(
            errors=[f"schemathesis exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}"]
        )
    return read_report(ndjson)


def start_server(max_tokens: int, key: str) -> tuple[subprocess.Popen, str]:
    argv = [sys.executable, "-m", "selfsteer.cli.main", "serve-llm", "--port", "0"]
    argv += ["--max-tokens", str(max_tokens), "--api-key", key]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # steadier on a shared 2-core machine
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    threading.Thread(target=process.stderr.read, daemon=True).start()
    for line in process.stdout:
        if match := URL.search(line):
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return process, match.group(1)
    raise RuntimeError(f"serve-llm exited with {process.wait()} before printing its URL")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=1000, help="test cases to run at least (default: 1000)")
    parser.add_argument(
        "--max-tokens", type=int, default=2, help="the server's --max-tokens (default: 2: cheap answers)"
    )
    parser.add_argument("--seed", type=int, default=0, help="first schemathesis seed (default: 0)")
    parser.add_argument(
        "--max-examples", type=int, default=200, help="schemathesis --max-examples per round (default: 200)"
    )
    parser.add_argument("--checks", default="all", help="schemathesis --checks (default: all)")
    parser.add_argument("--workdir", type=Path, help="where the reports go (default: a new temporary folder)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fuzz-serve-llm-"))
    workdir.mkdir(parents=True, exist_ok=True)

    key = secrets.token_urlsafe(12)
    started = time.perf_counter()
    process, root = start_server(args.max_tokens, key)
    try:
        with_key, seed = Report(), args.seed
        while with_key.cases < args.cases:
            found = run_schemathesis(
                root, workdir, key=key, max_examples=args.max_examples, seed=seed, checks=args.checks
            )
            with_key.add(found)
            print(f"  round seed {seed}: {found.cases} cases ({with_key.cases} so far)", flush=True)
            seed += 1
            if found.cases == 0:
                break  # schemathesis could not run (see the errors)
        without_key = run_schemathesis(
            root, workdir, key=None, max_examples=20, seed=seed, checks=args.checks
        )
        alive = httpx.post(
            f"{root}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        )
    finally:
        process.terminate()
        process.wait(timeout=30)

    both = Report()
    both.add(with_key)
    both.add(without_key)
    other = sum(both.failures.values()) - both.schema_violations
    names = (
        ", ".join(
            f"{name} {n}"
            for name, n in sorted(both.failures.items())
            if name != "response_schema_conformance"
        )
        or "none"
    )
    print(
        f"cases run:                   {both.cases} ({with_key.cases} with the key, {without_key.cases} without)"
    )
    print(f"5xx responses:               {both.server_errors}")
    print(f"response-schema violations:  {both.schema_violations}")
    print(f"other check failures:        {other} ({names})")
    print(f"schemathesis errors:         {len(both.errors)}")
    print(f"statuses with the key:       {dict(sorted(with_key.statuses.items()))}")
    print(f"statuses without the key:    {dict(sorted(without_key.statuses.items()))}")
    print(f"server alive afterwards:     {alive.status_code == 200} ({alive.status_code})")
    print(f"wall:                        {time.perf_counter() - started:.0f} s; reports in {workdir}")
    for error in both.errors[:5]:
        print(f"  error: {error}")
    clean = (
        with_key.cases >= args.cases
        and not (both.server_errors or both.failures or both.errors)
        and alive.status_code == 200
    )
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
