"""Benchmark: what an open dashboard costs a training run.

Paired runs of one recipe behind the bridge (server up, metrics stored and streamed), one with the
dashboard open in headless Chromium (a page subscribed to the WebSocket, drawing five charts, polling
decisions), one without; the order alternates. Printed: per pair and as medians, the wall-time ratio and
the ratios of the median and 25th-percentile step times, and the number of points the page drew. On a
2-core machine the browser's rendering competes with training for the same cores: that is the cost a
person pays for watching, and what this measures.

    python -m selfsteer.evals.bench.dashboard [--recipe small] [--steps 60] [--pairs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from transformers.utils import logging as hf_logging

from selfsteer import dashboard
from selfsteer.dashboard import CHROMIUM, CHROMIUM_ARGS
from selfsteer.evals.bench.bridge import make_step_timer, quantile
from selfsteer.trainer_bridge.recipe import load_recipe
from selfsteer.trainer_bridge.runner import RecipeRun


def timed_run(recipe: dict, root: Path, browser=None) -> dict:
    timer = make_step_timer()
    run = RecipeRun(
        recipe, out_dir=Path(tempfile.mkdtemp(dir=root)), db=root / "bench.sqlite", port=0, callbacks=[timer]
    )
    page = None
    try:
        if browser is not None:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(run.url)
            page.get_by_test_id("chart-loss").wait_for()  # loaded and subscribed before the first step
        summary = run.train()
        points = 0
        if page is not None:
            page.wait_for_timeout(1000)  # the last metrics batch
            points = int(page.get_by_test_id("chart-loss").get_attribute("data-points") or 0)
    finally:
        if page is not None:
            page.close()
        run.close()
    steps = timer.durations
    return {
        "wall": summary["wall_s"],
        "step_p25": quantile(steps, 0.25),
        "step_p50": quantile(steps, 0.5),
        "points": points,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="small", help="a built-in recipe or a YAML file (default: small)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (default: 60)")
    parser.add_argument("--pairs", type=int, default=5, help="paired runs (default: 5)")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright  # lazy: a dev dependency (pyproject's [dev])

    if dashboard.index_html() is None:
        print("the dashboard is not built: bash scripts/install.sh", file=sys.stderr)
        return 2
    hf_logging.set_verbosity_error()
    recipe = load_recipe(args.recipe, [f"training.max_steps={args.steps}"])
    root = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    keys = ("wall", "step_p25", "step_p50")
    ratios: dict[str, list[float]] = {k: [] for k in keys}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        timed_run(recipe, root)  # warm-up: the data set and imports, so the first pair is not penalised
        for i in range(args.pairs):
            if i % 2 == 0:
                plain, watched = timed_run(recipe, root), timed_run(recipe, root, browser)
            else:
                watched, plain = timed_run(recipe, root, browser), timed_run(recipe, root)
            for k in keys:
                ratios[k].append(watched[k] / plain[k])
            print(
                f"pair {i + 1}: without page {plain['wall']:.2f} s, with page {watched['wall']:.2f} s "
                f"(wall {ratios['wall'][-1]:.3f}x, step p50 {ratios['step_p50'][-1]:.3f}x, "
                f"p25 {ratios['step_p25'][-1]:.3f}x); the page drew {watched['points']} train-loss points",
                flush=True,
            )
        browser.close()
    print(
        f"{args.recipe}, {args.steps} steps, {args.pairs} pairs, medians of watched/unwatched: "
        + ", ".join(f"{k} {statistics.median(v):.3f}x" for k, v in ratios.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
