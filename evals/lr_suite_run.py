"""Running the lr-suite (evals/lr_suite.py: its cells, runs, scores and report): every cell not yet in
OUT/results.jsonl (an interrupted suite resumes; a failed cell runs again), populations under Ray Tune
(evals/pbt.py), the other runs here or as Ray Tune trials (evals/lr_suite_ray.py); then the report.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from selfsteer.evals.lr_suite import (
    SuiteConfig,
    append_result,
    cells,
    fill_shared,
    load_results,
    report,
    run_cell_retrying,
    shared_runs,
    suite_chat_model,
)
from selfsteer.evals.lr_suite_names import POPULATIONS


def run_suite(config: SuiteConfig, out: str | Path) -> list[dict]:
    """Run every cell (skipping those already in results.jsonl: an interrupted suite resumes; a failed
    one is run again), in this process or as Ray Tune trials (`config.ray`)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path, db = out / "results.jsonl", out / "suite.sqlite"
    done, every = load_results(results_path), cells(config)
    todo = [c for c in every if "error" in done.get(c.id, {"error": ""})]
    populations = [c for c in every if c.supervisor in POPULATIONS]
    if populations:
        from selfsteer.evals.pbt import run_pbt

        run_pbt(populations, {c.id for c in todo}, config, out)
        todo = [c for c in todo if c.supervisor not in POPULATIONS]
    shared = shared_runs(every)
    runs = [c for c in todo if c.id not in shared]
    if config.ray:
        from selfsteer.evals.lr_suite_ray import run_on_ray

        run_on_ray(runs, config, out)  # each trial's row lands in results.jsonl as it finishes
    else:
        chat_model = suite_chat_model(config) if any(c.supervisor.startswith("llm:") for c in runs) else None
        for cell in tqdm(runs, desc="lr-suite", unit="run"):
            append_result(results_path, run_cell_retrying(cell, config, out, db, chat_model))
    fill_shared(results_path, todo, shared)
    return list(load_results(results_path).values())


def main(config: SuiteConfig, out: str | Path) -> str:
    started = time.perf_counter()
    rows = run_suite(config, out)
    text = report(rows, config, out)
    print(text)
    failed = sum("error" in r for r in rows)
    print(
        f"{len(rows)} runs ({failed} failed), {time.perf_counter() - started:.0f} s; report: {Path(out) / 'report.md'}"
    )
    return text
