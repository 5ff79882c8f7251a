"""`selfsteer decisions collect`: counterfactual runs (evals/counterfactual.py) collected the resumable
way: this shard's specs not yet done, each run's rows then its summary appended as they come (a run
cut off mid-way is collected again, whole), a failing run retried and then written to failed.jsonl;
in this process or as Ray Tune trials (evals/counterfactual_ray.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from selfsteer.agents.counterfactual_rows import CounterfactualRow
from selfsteer.evals.counterfactual import RunSpec, collect_run, default_specs
from selfsteer.trainer_bridge.records import strict_json


@dataclass
class CollectConfig:
    out: str
    specs: list[RunSpec] = field(default_factory=default_specs)
    shard: tuple[int, int] = (0, 1)  # (index, count): this process collects every count-th spec
    retries: int = 1  # a failed run is collected again this many times, then written to OUT/failed.jsonl
    # Ray Tune (evals/counterfactual_ray.py): each run a trial, on this machine's Ray or on a cluster
    ray: bool = False
    ray_address: str | None = None  # default $RAY_ADDRESS, else Ray started here
    ray_cpus: int | None = None  # the CPUs of a Ray started here (default: all)
    cpus_per_trial: float = 1  # and torch threads per run
    max_concurrent: int | None = None  # default: as many trials as the CPUs fit


def collect(config: CollectConfig, progress: bool = True, failures: list | None = None) -> list[dict]:
    """Collects every spec of this shard not yet done (an interrupted collection resumes), in this process
    or as Ray Tune trials (`config.ray`), writing each run's rows to OUT/rows.jsonl and then its summary to
    OUT/runs.jsonl as they come. A run that still fails after `config.retries` is written to
    OUT/failed.jsonl (and to `failures`), reported on stderr, and collected again by the next call.
    Every file is strict JSON lines: a non-finite number is null (`records.strict_json`)."""
    from tqdm.auto import tqdm

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    index, count = config.shard
    runs_path, rows_path = out / "runs.jsonl", out / "rows.jsonl"
    done = set()
    if runs_path.exists():
        done = {json.loads(line)["run"] for line in runs_path.read_text().splitlines() if line.strip()}
        # Rows of a run cut off mid-way are dropped: the run is collected again, whole.
        if rows_path.exists():
            kept = [
                line
                for line in rows_path.read_text().splitlines()
                if line.strip() and CounterfactualRow.from_json(line).run in done
            ]
            rows_path.write_text("".join(line + "\n" for line in kept))
    todo = [s for i, s in enumerate(config.specs) if i % count == index and s.id not in done]
    summaries, failures = [], [] if failures is None else failures
    with rows_path.open("a") as rows_file, runs_path.open("a") as runs_file:

        def write_rows(rows: list[CounterfactualRow]) -> None:
            rows_file.writelines(row.to_json() + "\n" for row in rows)
            rows_file.flush()

        def finished(summary: dict) -> None:  # after its rows: runs.jsonl is what marks a run done
            runs_file.write(strict_json(summary) + "\n")
            runs_file.flush()
            summaries.append(summary)

        def failed(spec: RunSpec, error: str, attempts: int, **extra) -> None:
            failure = {"run": spec.id, "spec": spec.to_dict(), "error": error, "attempts": attempts, **extra}
            with (out / "failed.jsonl").open("a") as file:
                file.write(strict_json(failure) + "\n")
            failures.append(failure)

        if config.ray:
            from selfsteer.evals.counterfactual_ray import collect_on_ray

            collect_on_ray(todo, config, write_rows, finished, failed)
        else:
            for spec in tqdm(todo, desc="counterfactual runs", unit="run", disable=not progress):
                for attempt in range(1, config.retries + 2):
                    start = rows_file.tell()
                    try:
                        summary = collect_run(spec, on_row=lambda row: write_rows([row]))
                    except Exception as error:  # retried, then written to failed.jsonl
                        rows_file.truncate(start)  # the failed attempt's rows
                        rows_file.seek(start)
                        if attempt > config.retries:
                            failed(spec, f"{type(error).__name__}: {error}", attempt)
                        continue
                    finished(summary)
                    break
    if failures:
        print(
            f"{len(failures)} runs failed after {config.retries + 1} attempts (OUT/failed.jsonl): "
            + ", ".join(f["run"] for f in failures),
            file=sys.stderr,
        )
    return summaries
