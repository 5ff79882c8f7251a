"""The dashboard in a real browser (tests/test_dashboard.py): a page that records its console errors
and takes screenshots (runs/screenshots, or $SELFSTEER_SCREENSHOTS), and what its charts draw."""

from __future__ import annotations

import os
import time
from pathlib import Path

from selfsteer.trainer_bridge.store import Store

SCREENSHOTS = Path(os.environ.get("SELFSTEER_SCREENSHOTS", "runs/screenshots"))


class Page:
    """A fresh browser page that records console errors and uncaught exceptions."""

    def __init__(self, browser, name: str):
        self.name = name
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def by_id(self, test_id: str):
        return self.page.get_by_test_id(test_id)

    def attr_int(self, test_id: str, name: str) -> int:
        return int(self.by_id(test_id).get_attribute(name) or 0)

    def wait_until(self, condition, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.screenshot("timeout")
                raise AssertionError(f"{self.name}: timed out waiting for {what}")
            self.page.wait_for_timeout(100)

    def screenshot(self, label: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{self.name}-{label}.png"
        self.page.screenshot(path=str(path))
        return path

    def console_lines(self, kind: str) -> list[str]:
        return self.page.locator(f'[data-testid="console-line"][data-kind="{kind}"]').all_inner_texts()

    def close(self) -> None:
        self.context.close()


def chart_series(page: Page, name: str) -> list[str]:
    return [s for s in (page.by_id(f"chart-{name}").get_attribute("data-series") or "").split(",") if s]


def curve_at(store: Store, run_id: str, name: str, step: int) -> float:
    """The height of a metric's line (main branch) at a step: its value there, or linear between the
    values either side, as the chart draws it."""
    points = [(r["step"], r["value"]) for r in store.get_metrics(run_id, names=[name], branch="main")]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= step <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (step - x0) / (x1 - x0)
    raise AssertionError(f"no {name} around step {step}: {points}")


def assert_markers_on_the_curve(page: Page, store: Store, run_id: str, name: str) -> list[tuple[str, int]]:
    """Every decision marker on the chart sits on the line at its step, whatever its action (a marker's
    data-value is the value at its height on the chart's y scale)."""
    values = [r["value"] for r in store.get_metrics(run_id, names=[name], branch="main")]
    tolerance = 0.03 * (max(values) - min(values)) + 1e-3  # about 3 px of a chart 150 px high
    markers = page.by_id(f"chart-{name}").get_by_test_id("decision-marker")
    seen = []
    for i in range(markers.count()):
        marker = markers.nth(i)
        action, step = marker.get_attribute("data-action"), int(marker.get_attribute("data-step"))
        drawn, expected = float(marker.get_attribute("data-value")), curve_at(store, run_id, name, step)
        assert abs(drawn - expected) <= tolerance, (
            f"{action} at step {step} drawn at {drawn}, the curve is at {expected}"
        )
        seen.append((action, step))
    return seen
