"""What one request for a long run's metrics costs now that they come in pages (issue 10: one GET
/api/metrics at step 240k returned 204 MB in 11 s).

    .venv/bin/python -m selfsteer.evals.bench.pages --steps 240000

Fills a store with one run of --steps steps (5 metrics a step, as a training log writes them), serves it
with `create_history_app` on loopback (real uvicorn), and prints for GET /api/runs/{id}/metrics: the first
page (size, time), every page followed through `Link` (count, size, time) and the down-sampled history the
dashboard asks for (`points=1000`: size, time, rows).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import httpx

from selfsteer.trainer_bridge.net import serving
from selfsteer.trainer_bridge.server import create_history_app
from selfsteer.trainer_bridge.store import Store

NAMES = ("loss", "grad_norm", "learning_rate", "epoch", "samples_per_s")


def fill(store, run_id: str, steps: int, batch: int = 20_000) -> None:
    for start in range(1, steps + 1, batch):
        rows = [
            {"step": step, "name": name, "value": 2.0 + math.sin(step / 97) + 0.01 * i}
            for step in range(start, min(start + batch, steps + 1))
            for i, name in enumerate(NAMES)
        ]
        store.add_metrics(run_id, rows)


def timed_get(client: httpx.Client, url: str, **params) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    response = client.get(url, params=params or None)
    response.raise_for_status()
    return response, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selfsteer.evals.bench.pages", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--steps", type=int, default=240_000, help="steps of the run (default 240000)")
    parser.add_argument(
        "--points",
        type=int,
        default=1000,
        help="points= of the down-sampled request (default: the dashboard's)",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "pages.sqlite") as store:
        run_id = store.create_run("bench-pages")
        start = time.perf_counter()
        fill(store, run_id, args.steps)
        print(
            f"store: {args.steps} steps, {args.steps * len(NAMES)} rows in {time.perf_counter() - start:.1f} s"
        )
        with serving(create_history_app(store, [], token=None)) as url, httpx.Client(timeout=600) as client:
            path = f"{url}/api/runs/{run_id}/metrics"
            first, seconds = timed_get(client, path)
            print(
                f"first page:       {len(first.json())} rows, {len(first.content) / 1e6:.2f} MB, {seconds:.2f} s"
            )
            pages, size, start = 1, len(first.content), time.perf_counter()
            response = first
            while "next" in response.links:
                response, _ = timed_get(client, url + response.links["next"]["url"])
                pages += 1
                size += len(response.content)
            print(
                f"every page:       {pages} pages, {size / 1e6:.1f} MB, "
                f"{seconds + time.perf_counter() - start:.1f} s"
            )
            thin, seconds = timed_get(client, path, points=args.points)
            print(
                f"points={args.points}:      {len(thin.json())} rows, {len(thin.content) / 1e6:.2f} MB, "
                f"{seconds:.2f} s, next page: {'yes' if 'next' in thin.links else 'no'}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
