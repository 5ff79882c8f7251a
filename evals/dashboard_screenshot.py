"""A screenshot of the dashboard during a supervised run (the README's picture).

Starts `selfsteer train` with a supervisor (the embedded LLM by default), lets a person's hand show too
(a checkpoint saved, then loaded into a branch at a lower learning rate, through the API with source
"human"), opens the dashboard in Debian's headless Chromium, hovers the latest decision marker and saves
the page. Then stops the run.

    .venv/bin/python -m selfsteer.evals.dashboard_screenshot --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selfsteer.dashboard import CHROMIUM, CHROMIUM_ARGS
from selfsteer.trainer_bridge.client import BridgeClient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="docs/dashboard.png", help="the PNG to write")
    parser.add_argument("--recipe", default="small")
    parser.add_argument("--lr", default="2e-4", help="starting learning rate (default: too low, 2e-4)")
    parser.add_argument(
        "--supervisor", default="llm", help="as `selfsteer train --supervisor` (default: llm)"
    )
    parser.add_argument(
        "--branch-at", type=int, default=150, help="step of the checkpoint the branch starts from"
    )
    parser.add_argument("--shot-at", type=int, default=320, help="step at which the screenshot is taken")
    parser.add_argument("--chromium", default=CHROMIUM, help=f"the browser (default: {CHROMIUM})")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright  # lazy: a dev dependency (pyproject's [dev])

    work = Path(tempfile.mkdtemp(prefix="selfsteer-shot-"))
    command = [
        sys.executable, "-m", "selfsteer.cli.main", "train", "--recipe", args.recipe,
        "--set", f"training.learning_rate={args.lr}", "--set", f"training.max_steps={args.shot_at + 200}",
        "--set", "training.eval_steps=25", "--supervisor", args.supervisor,
        "--port", "0", "--out", str(work / "run"), "--db", str(work / "selfsteer.sqlite"),
    ]  # the train command as a user types it # fmt: skip
    log = work / "train.log"  # a file, not a pipe: nobody would drain a pipe and the run would block
    train = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        url = None
        while url is None and train.poll() is None:
            time.sleep(0.2)
            if match := re.search(r"(http://[\d.:]+)/", log.read_text()):
                url = match.group(1)
        if url is None:
            raise SystemExit(f"the run did not start; see {log}")
        print(f"run at {url}, log in {log}")
        client = BridgeClient(url, source="human")
        wait_for_step(client, args.branch_at)
        client.wait(client.save_checkpoint(f"step-{args.branch_at}")["uuid"])
        wait_for_step(client, args.branch_at + 60)
        client.wait(client.load_checkpoint(f"step-{args.branch_at}", branch="lower-lr")["uuid"])
        lr = client.state()["optimizer"]["lr"]
        client.wait(client.set_lr(lr / 4)["uuid"])

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            wait_for_step(client, args.shot_at)
            page.wait_for_timeout(1500)  # the last metrics batch and the decisions poll
            markers = page.get_by_test_id("chart-loss").get_by_test_id("decision-marker")
            marked = markers.count()
            if marked:
                markers.nth(marked - 1).hover()
                page.wait_for_timeout(300)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out)
            browser.close()
        print(f"wrote {args.out} at step {client.state()['step']} ({marked} decisions marked)")
        client.stop()
        client.close()
    finally:
        try:
            train.wait(60)
        except subprocess.TimeoutExpired:
            train.kill()
    return 0


def wait_for_step(client, step: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while client.state()["step"] < step:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the run never reached step {step}")
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
