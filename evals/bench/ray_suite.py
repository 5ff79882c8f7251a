"""Wall time of the same lr-suite run one after the other in one process, and as Ray Tune trials on a Ray
started on this machine, at concurrency 1 and at `--cpus` concurrent trials; and Ray's overhead per trial.

    .venv/bin/python -m selfsteer.evals.bench.ray_suite [--seeds 0,1] [--cpus 2] [--repeats 2]

Each measurement runs in a fresh process on a fresh output folder (imports and model building included,
the report left out), one torch thread per run in every mode, in an order alternated between repeats.
Ray's overhead per trial = (Ray at concurrency 1 - sequential - ray.init) / trials: a worker process
per trial that imports torch and transformers again, and Tune's scheduling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

MEASURE = """
import json, sys, time, torch
from selfsteer.evals.lr_suite import SuiteConfig, cells
from selfsteer.evals.lr_suite_run import run_suite
mode, out, seeds, cpus = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")], int(sys.argv[4])
torch.set_num_threads(1)
config = SuiteConfig(
    recipes=["tiny"], lrs={"tiny": {"good": 1e-2, "too_high": 1.0}}, grid_lrs={}, seeds=seeds,
    supervisors=["static", "rule"], ray=mode != "sequential", ray_cpus=cpus,
    max_concurrent=1 if mode == "ray-1" else None,
)
init_s = 0.0
if config.ray:
    from selfsteer.evals.ray_trials import start_ray
    started = time.perf_counter()
    start_ray(config.ray_address, config.ray_cpus)
    init_s = time.perf_counter() - started
started = time.perf_counter()
rows = run_suite(config, out)
wall = time.perf_counter() - started + init_s
assert len(rows) == len(cells(config)) and not any("error" in r for r in rows), rows
print(json.dumps({"wall_s": wall, "init_s": init_s, "trials": len(rows)}))
"""


def measure(mode: str, seeds: str, cpus: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        result = subprocess.run(
            [sys.executable, "-c", MEASURE, mode, out, seeds, str(cpus)], capture_output=True, text=True
        )
    if result.returncode:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1", help="tiny, good and too-high starts, static and rule")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    modes = ["sequential", "ray-1", f"ray-{args.cpus}"]
    walls: dict[str, list[float]] = {m: [] for m in modes}
    inits, trials = [], 0
    for repeat in range(args.repeats):
        for mode in modes if repeat % 2 == 0 else modes[::-1]:
            m = measure(mode, args.seeds, args.cpus)
            walls[mode].append(m["wall_s"])
            inits += [m["init_s"]] if mode != "sequential" else []
            trials = m["trials"]
            print(f"{mode:>10}: {m['wall_s']:6.1f} s (ray.init {m['init_s']:.1f} s)", flush=True)
    median = {m: statistics.median(w) for m, w in walls.items()}
    init = statistics.median(inits)
    print(f"\n{trials} runs, medians of {args.repeats}:")
    for mode in modes:
        print(f"  {mode:>10}: {median[mode]:6.1f} s ({median['sequential'] / median[mode]:.2f}x sequential)")
    overhead = (median["ray-1"] - median["sequential"] - init) / trials
    print(f"  ray.init: {init:.1f} s; Ray's overhead per trial (concurrency 1): {overhead:.1f} s")


if __name__ == "__main__":
    main()
