"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, against real tiny
training runs behind the real control server. Every test saves screenshots (runs/screenshots, or
$SELFSTEER_SCREENSHOTS) and fails on any console error the page logs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers.self_correct import AlwaysDouble, supervised_run
from playwright.sync_api import sync_playwright

from selfsteer import dashboard
from selfsteer.agents.supervisors import Decision, Supervisor
from selfsteer.dashboard import CHROMIUM, CHROMIUM_ARGS
from selfsteer.graphs.supervise import SelfCorrection, run_supervision
from selfsteer.trainer_bridge.records import NewDecision
from selfsteer.trainer_bridge.store import Store
from selfsteer.trainer_bridge.testing import LiveRun

SCREENSHOTS = Path(os.environ.get("SELFSTEER_SCREENSHOTS", "runs/screenshots"))
LONG_RUN = ["training.max_steps=100000", "training.eval_steps=50"]  # stopped by the test


def test_a_rollback_is_marked_and_the_abandoned_branch_faded_in_the_history(tmp_path, open_page):
    """A self-correcting supervisor's bad decision is rolled back (tests/test_self_correct.py): the
    history marks the rollback on the loss charts at the step it happened and draws the branch it left
    faded; the rolled-back decision's tooltip says why."""
    summary, _, db = supervised_run(tmp_path, AlwaysDouble(), 0.1, SelfCorrection())
    with Store(db) as store:
        failed = next(d for d in store.list_decisions(summary["run_id"]) if d["rolled_back"])
    server = subprocess.Popen(
        [sys.executable, "-m", "selfsteer.cli.main", "dashboard", "--db", str(db), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        match = None
        for line in server.stdout:
            if match := re.search(r"(http://127\.0\.0\.1:\d+)/", line):
                break
        assert match
        page = open_page(match.group(1))
        page.by_id(f"run-row-{summary['run_id']}").click()
        lines = page.by_id("chart-eval_loss").get_by_test_id("rollback-marker")
        page.wait_until(lambda: lines.count() >= 1, "a rollback marker on the eval loss chart")
        iteration = next(i for i, d in enumerate(summary["decisions"], 1) if d["rolled_back"])
        assert lines.nth(0).get_attribute("data-branch") == f"retry-{iteration}"
        assert int(lines.nth(0).get_attribute("data-step")) > failed["step"]
        assert f"rolled back to step {failed['step']}" in lines.nth(0).get_attribute("title")
        # Both branches drawn; main, which the rollback left, faded.
        assert {"main", f"retry-{iteration}"} <= set(chart_series(page, "eval_loss"))
        assert page.by_id("chart-eval_loss").get_attribute("data-faded") == "main"
        rolled = page.page.get_by_test_id("decision-row").nth(iteration - 1)
        assert "double" in rolled.inner_text() and "rolled back" in rolled.inner_text()
        assert failed["reflection"] in rolled.inner_text()
        page.screenshot("rollback")
        assert page.errors == []
    finally:
        server.terminate()
        server.wait(10)


DASHBOARD = Path(dashboard.__file__).parent


def test_the_dashboard_is_typed_by_the_servers_openapi():
    """The page's types are generated from the control server's OpenAPI (dashboard/openapi.py dumps it,
    openapi-typescript turns it into src/api-types.ts, both at build time): the dump has every route the
    page calls and every schema it names, and the build used this very document."""
    from selfsteer.dashboard.openapi import document

    openapi = document()
    api_ts = (DASHBOARD / "src" / "api.ts").read_text(encoding="utf-8")
    types_ts = (DASHBOARD / "src" / "types.ts").read_text(encoding="utf-8")
    routes = set(re.findall(r'(?:Got|Row|Posted)<"([^"]+)">', api_ts))
    schemas = set(re.findall(r'Schemas\["(\w+)"\]', types_ts))
    assert {
        "/api/state",
        "/api/metrics",
        "/api/decisions",
        "/api/commands",
        "/api/runs/{run_id}/decisions",
    } <= routes
    assert {"RunState", "Decision", "Command", "MetricPoint", "Branch", "Run"} <= schemas
    assert routes <= set(openapi["paths"]), routes - set(openapi["paths"])
    assert schemas <= set(openapi["components"]["schemas"]), schemas - set(openapi["components"]["schemas"])
    assert (
        "post" in openapi["paths"]["/api/commands"]
        and "get" in openapi["paths"]["/api/runs/{run_id}/metrics"]
    )
    # What the build generated (git-ignored, so never a stale copy): from this server, and naming them all.
    dumped, generated = DASHBOARD / "openapi.json", DASHBOARD / "src" / "api-types.ts"
    assert dumped.is_file() and generated.is_file(), "the dashboard is not built: run bash scripts/install.sh"
    assert json.loads(dumped.read_text(encoding="utf-8")) == json.loads(json.dumps(openapi)), (
        "the dashboard was built against another OpenAPI than this server's: run bash scripts/install.sh"
    )
    text = generated.read_text(encoding="utf-8")
    assert "auto-generated by openapi-typescript" in text
    for name in schemas:
        assert re.search(rf"^\s+{name}: ", text, re.M), name
    for route in routes:
        assert f'"{route}": {{' in text, route


@pytest.fixture(scope="module")
def browser(one_torch_thread):
    if dashboard.index_html() is None:
        pytest.fail("the dashboard is not built: run bash scripts/install.sh (it needs npm)")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (scripts/test.sh does it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


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


@pytest.fixture
def open_page(browser, request):
    pages: list[Page] = []

    def open_(url: str) -> Page:
        page = Page(browser, request.node.name.removeprefix("test_"))
        pages.append(page)
        page.page.goto(url)
        return page

    yield open_
    for page in pages:
        page.close()


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


def test_live_charts_grow_halve_changes_lr_and_a_checkpoint_draws_a_branch(tmp_path, open_page):
    with LiveRun(tmp_path, LONG_RUN, gates=[20]) as live:
        live.gate.wait(20)  # steps 1..19 are logged; step 20's log comes after the gate
        page = open_page(live.run.url)
        page.wait_until(lambda: page.attr_int("chart-loss", "data-points") >= 19, "the first 19 losses")
        held = page.attr_int("chart-loss", "data-points")
        assert held == 19, "one train-loss point per logged step, nothing more while training is held"
        assert page.attr_int("chart-learning_rate", "data-points") == 19
        assert page.by_id("current-lr").inner_text().strip() in ("0.003", "3e-3", "3.00e-3", "3.000e-3")
        page.screenshot("held")

        live.gate.release(20)
        page.wait_until(lambda: page.attr_int("chart-loss", "data-points") > held + 50, "the chart to grow")
        page.wait_until(lambda: page.attr_int("chart-eval_loss", "data-points") >= 1, "an eval point")
        assert page.attr_int("chart-grad_norm", "data-points") > 0
        assert page.attr_int("chart-samples_per_s", "data-points") > 0

        # "halve" in the optimizer panel: a human command, applied at a step, the lr halved in the run.
        page.by_id("lr-halve").click()
        page.wait_until(lambda: _human_commands(live, "set_optimizer", "success"), "halve to be applied")
        (command,) = _human_commands(live, "set_optimizer", "success")
        assert command["args"] == {"lr": pytest.approx(0.0015)}
        assert isinstance(command["step"], int) and command["step"] > 20
        assert live.client.state()["optimizer"]["lr"] == pytest.approx(0.0015)
        row = page.by_id(f"command-{command['uuid']}")
        page.wait_until(lambda: row.get_attribute("data-status") == "success", "the page to show success")
        assert str(command["step"]) in row.inner_text()
        page.wait_until(lambda: "0.0015" in page.by_id("current-lr").inner_text()
                        or "1.5e-3" in page.by_id("current-lr").inner_text(), "the new lr on the page")  # fmt: skip
        page.wait_until(
            lambda: any(str(command["step"]) in line for line in page.console_lines("ack")), "the ack"
        )
        page.screenshot("halved")

        # Save a checkpoint, then load it into a new branch: the tree and the charts show the branch.
        page.by_id("ckpt-name").fill("before-branch")
        page.by_id("ckpt-save").click()
        page.by_id("ckpt-row-before-branch").wait_for()
        page.by_id("ckpt-new-branch").fill("retry")
        page.by_id("ckpt-load-before-branch").click()
        page.by_id("branch-retry").wait_for()
        page.wait_until(lambda: "retry" in chart_series(page, "loss"), "a train-loss series for the branch")
        assert "main" in chart_series(page, "loss")
        (load,) = _human_commands(live, "load_checkpoint", "success")
        assert load["result"]["branch"] == "retry" and load["result"]["parent"] == "main"
        assert [b["name"] for b in live.client.branches()] == ["main", "retry"]
        page.screenshot("branch")

        # Stop asks for a confirmation first, then ends the run.
        page.by_id("run-stop").click()
        assert live.bridge.phase == "running"
        page.by_id("run-stop-confirm").click()
        live.join()
        assert live.bridge.phase == "stopped"
        page.wait_until(lambda: "ended" in page.by_id("connection").inner_text(), "the page to see the end")
        assert page.errors == []


def _human_commands(live: LiveRun, type: str, status: str) -> list[dict]:
    return [
        c
        for c in live.client.commands()
        if c["type"] == type and c["source"] == "human" and c["status"] == status
    ]


def test_bad_input_is_refused_in_the_page_and_nothing_is_sent(tmp_path, open_page):
    with LiveRun(tmp_path, LONG_RUN, gates=[10]) as live:
        live.gate.wait(10)
        page = open_page(live.run.url)
        posts: list[str] = []  # every command the page sends, whether the server takes it or not
        page.page.on(
            "request",
            lambda r: (
                posts.append(r.post_data or "") if "/api/commands" in r.url and r.method == "POST" else None
            ),
        )
        page.by_id("lr-input").wait_for()
        error = page.by_id("control-error")
        assert error.count() == 0  # no error before the first input
        for bad in ("abc", "-1", "0", "1e9"):
            page.by_id("lr-input").fill(bad)
            page.by_id("lr-apply").click()
            # The message names this very input: a stale one from the previous input does not match.
            message = f'"{bad}" is not a learning rate'
            shown = lambda message=message: error.count() == 1 and error.inner_text().startswith(message)  # noqa: E731
            page.wait_until(shown, message)
            assert "like 3e-4" in error.inner_text()  # with what it wants instead
            assert posts == [] and live.client.commands() == [], (bad, posts)
        page.screenshot("refused")

        # The control: a good value is sent (one POST, one journal row) and the error goes away.
        page.by_id("lr-input").fill("0.001")
        page.by_id("lr-apply").click()
        page.wait_until(lambda: len(live.client.commands()) == 1, "the good value in the journal")
        page.wait_until(lambda: error.count() == 0, "the error to go")
        (command,) = live.client.commands()
        assert command["type"] == "set_optimizer" and command["args"] == {"lr": 0.001}
        assert len(posts) == 1 and '"lr":0.001' in posts[0].replace(" ", ""), posts
        live.gate.release(10)
        live.client.stop()
        live.join()
        assert page.errors == []


def test_run_optimizer_and_data_controls_post_human_commands_and_show_their_status(tmp_path, open_page):
    with LiveRun(tmp_path, LONG_RUN) as live:
        page = open_page(live.run.url)
        page.wait_until(lambda: page.attr_int("chart-loss", "data-points") >= 5, "the first losses")
        page.by_id("run-pause").click()
        page.wait_until(lambda: live.bridge.paused, "the run to pause")
        page.by_id("paused-badge").wait_for()
        paused_at = live.client.state()["step"]

        # Sent while paused: all applied at the paused step, one of them fails (no such data set).
        page.by_id("wd-input").fill("0.05")
        page.by_id("wd-apply").click()
        page.by_id("clip-input").fill("0.5")
        page.by_id("clip-apply").click()
        page.by_id("run-evaluate").click()
        page.by_id("data-reload").click()  # the current data set, reloaded
        page.by_id("data-dataset").fill("nope")
        page.by_id("data-reload").click()
        rows = page.page.locator('[data-testid^="command-"]')
        page.wait_until(lambda: rows.count() == 6, "six commands listed (pause and five more)")
        page.wait_until(
            lambda: all(rows.nth(i).get_attribute("data-status") in ("success", "failed") for i in range(6)),
            "every command to succeed or fail",
        )
        journal = {(c["type"], c["status"]) for c in live.client.commands()}
        assert journal == {
            ("pause", "success"),
            ("set_optimizer", "success"),
            ("set_max_grad_norm", "success"),
            ("evaluate", "success"),
            ("reload_data", "success"),
            ("reload_data", "failed"),
        }
        commands = live.client.commands()
        assert {c["source"] for c in commands} == {"human"}
        assert {c["step"] for c in commands if c["type"] != "pause"} == {paused_at}
        (failed,) = [c for c in commands if c["status"] == "failed"]
        assert failed["args"] == {"dataset": "nope"}
        assert "no data factory 'nope'" in page.by_id(f"command-{failed['uuid']}").inner_text()
        state = live.client.state()
        assert state["optimizer"]["weight_decay"] == pytest.approx(0.05) and state["max_grad_norm"] == 0.5
        held = page.attr_int("chart-loss", "data-points")
        page.page.wait_for_timeout(1000)
        assert page.attr_int("chart-loss", "data-points") == held, "no training while paused"
        page.screenshot("paused")

        page.by_id("run-resume").click()
        page.wait_until(lambda: page.attr_int("chart-loss", "data-points") > held + 20, "training to go on")
        live.client.stop()
        live.join()
        assert page.errors == []


def test_exploding_run_warns_in_the_console(tmp_path, open_page):
    with LiveRun(tmp_path, LONG_RUN) as live:
        page = open_page(live.run.url)
        page.wait_until(lambda: page.attr_int("chart-grad_norm", "data-points") >= 30, "some grad norms")
        # The largest lr the server accepts, 333 times the run's: the grad norms jump.
        page.by_id("lr-input").fill("1")
        page.by_id("lr-apply").click()
        page.wait_until(lambda: page.console_lines("warning"), "a warning", timeout=60)
        warnings = page.console_lines("warning")
        assert any(re.search(r"grad norm exploding|NaN loss", w) for w in warnings), warnings
        (command,) = live.client.commands()  # the warning follows the lr the page sent, and applied
        assert command["args"] == {"lr": 1.0} and command["status"] == "success"
        page.screenshot("warning")
        live.client.stop()
        live.join()
        assert page.errors == []


class Scripted(Supervisor):
    name = "scripted"

    def __init__(self, decisions):
        self.decisions = list(decisions)

    def decide(self, observation):
        return self.decisions.pop(0) if self.decisions else Decision("keep", "nothing more to say")


def test_decision_markers_tooltips_and_the_history_view(tmp_path, open_page):
    """A supervisor decides at the evaluations; the live page marks each decision on the loss charts,
    the tooltip tells what and why. After the run, `selfsteer dashboard` shows it in the history."""
    supervisor = Scripted(
        [Decision("halve", "the loss went up twice in a row"), Decision("double", "steady fall, too slow")]
    )
    overrides = ["training.max_steps=100000", "training.eval_steps=40"]
    with LiveRun(tmp_path, overrides, gates=[41, 81, 121]) as live, Store(live.db) as store:
        thread = threading.Thread(
            target=run_supervision,
            args=(live.run.url, supervisor),
            kwargs={"db": str(live.db), "max_iterations": 3},
            daemon=True,
        )
        thread.start()
        # Evaluations at 40, 80, 120; training waits after each until its decision is in the store.
        for gate, decided in ((41, 1), (81, 2), (121, 3)):
            live.gate.wait(gate)
            deadline = time.monotonic() + 60
            while len(store.list_decisions(live.run.run_id)) < decided and time.monotonic() < deadline:
                time.sleep(0.05)
            if gate != 121:
                live.gate.release(gate)
        page = open_page(live.run.url)
        markers = page.page.get_by_test_id("chart-loss").get_by_test_id("decision-marker")
        page.wait_until(lambda: markers.count() == 3, "three decision markers on the loss chart")
        assert [markers.nth(i).get_attribute("data-action") for i in range(3)] == ["halve", "double", "keep"]
        assert len(assert_markers_on_the_curve(page, store, live.run.run_id, "loss")) == 3
        # Each marker stands where its decision took effect (a keep sends nothing: where it was observed).
        decisions = store.list_decisions(live.run.run_id)
        assert [d["applied_step"] is not None for d in decisions] == [True, True, False]
        effect = [d["applied_step"] if d["applied_step"] is not None else d["step"] for d in decisions]
        assert [int(markers.nth(i).get_attribute("data-step")) for i in range(3)] == effect
        assert [int(markers.nth(i).get_attribute("data-observed-step")) for i in range(3)] == [
            d["step"] for d in decisions
        ]
        markers.nth(0).hover()
        tooltip = page.by_id("decision-tooltip")
        tooltip.wait_for()
        text = tooltip.inner_text()
        assert "halve" in text and "the loss went up twice in a row" in text and "scripted" in text
        # Seen at the evaluation of step 40 (training held at 41), its command applied at a later boundary.
        applied = decisions[0]["applied_step"]
        assert decisions[0]["step"] == 40 and applied > 40
        assert f"observed at step 40, took effect at step {applied}" in text
        assert len(page.console_lines("decision")) == 3
        page.screenshot("markers")
        live.gate.release(121)
        live.client.stop()
        live.join()
        thread.join(30)
        run_id = live.run.run_id
        assert page.errors == []
        # A decision between two evaluations (they come every 40 steps): its marker goes on the eval loss
        # line there, not at the height of the evaluation before it (nor at a fixed one).
        store.add_decision(
            run_id, NewDecision(step=100, agent="late", action="keep", explanation="between two evaluations")
        )

    # The history: a server over the store alone, no run training.
    server = subprocess.Popen(
        [sys.executable, "-m", "selfsteer.cli.main", "dashboard", "--db", str(live.db), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # warnings go there; the URL line is on stdout
        text=True,
    )
    try:
        lines = []
        for line in server.stdout:
            lines.append(line)
            if match := re.search(r"(http://127\.0\.0\.1:\d+)/", line):
                break
        assert match, lines
        page = open_page(match.group(1))
        page.by_id(f"run-row-{run_id}").click()
        page.wait_until(lambda: page.attr_int("chart-loss", "data-points") >= 120, "the run's losses")
        assert page.page.get_by_test_id("decision-row").count() == 4
        assert "the loss went up twice in a row" in page.by_id("decision-log").inner_text()
        for name in ("loss", "eval_loss"):
            markers = page.by_id(f"chart-{name}").get_by_test_id("decision-marker")
            page.wait_until(lambda markers=markers: markers.count() == 4, f"four decision markers on {name}")
        with Store(live.db) as store:
            for name in ("loss", "eval_loss"):
                drawn = assert_markers_on_the_curve(page, store, run_id, name)
                assert [action for action, _ in drawn] == ["halve", "double", "keep", "keep"], (name, drawn)
        journal = page.by_id("journal").inner_text()
        assert "set_optimizer" in journal and "stop" in journal
        page.screenshot("history")
        assert page.errors == []
    finally:
        server.terminate()
        server.wait(10)


def test_token_protected_server_asks_for_the_token(tmp_path, open_page):
    with LiveRun(tmp_path, LONG_RUN, gates=[10], token="s3cret-token") as live:
        live.gate.wait(10)
        page = open_page(live.run.url)
        page.by_id("token-form").wait_for()
        page.by_id("token-input").fill("wrong")
        page.by_id("token-submit").click()
        page.by_id("token-error").wait_for()
        page.screenshot("refused")
        page.by_id("token-input").fill("s3cret-token")
        page.by_id("token-submit").click()
        page.wait_until(lambda: page.attr_int("chart-loss", "data-points") >= 9, "the charts, with the token")
        page.wait_until(lambda: page.by_id("connection").inner_text().strip() == "live", "the WebSocket")

        # A link with ?token= works at once, and the token leaves the address bar.
        direct = open_page(f"{live.run.url}/?token=s3cret-token")
        direct.wait_until(lambda: direct.attr_int("chart-loss", "data-points") >= 9, "the charts via ?token=")
        assert "token" not in direct.page.url
        live.gate.release(10)
        live.client.stop()
        live.join()
        # 401s of the refused token are the browser's own console errors: expected here, and only those.
        assert all("401" in e for e in page.errors), page.errors
        assert direct.errors == []
