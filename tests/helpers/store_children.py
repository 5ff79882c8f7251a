"""Two processes on one store file at once (tests/test_store.py): each child opens the store, or opens
it only when told to go, so that both race on the same moment."""

import json
import subprocess
import sys
import time

# A child process: opens the store (or not yet), says it is ready, waits for "go", then works and
# prints a JSON report. argv: mode path ready_file go_file tag [run_id]
CHILD = r"""
import json, sys, time
from pathlib import Path
from selfsteer.trainer_bridge.store import Store

mode, path, ready, go, tag = sys.argv[1:6]
store = Store(path) if mode == "write" else None
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.002)
if mode == "open":
    store = Store(path)
    report = {"applied": store.applied_migrations, "version": store.schema_version}
else:
    run = sys.argv[6]
    for i in range(300):
        uuid = store.add_command(run, "set_optimizer", {"lr": i}, tag)["uuid"]
        store.update_command(uuid, "running", step=i)
        store.add_metrics(run, [{"step": i, "name": tag, "value": float(i)}])
        store.update_command(uuid, "success", result={"i": i})
    report = {"written": 300}
store.close()
print(json.dumps(report))
"""


def run_children(tmp_path, mode, path, extra=()):
    """Starts two child processes, lets them go at the same moment, returns their reports."""
    go = tmp_path / f"go-{mode}"
    children = []
    for tag in ("proc-a", "proc-b"):
        ready = tmp_path / f"ready-{mode}-{tag}"
        argv = [sys.executable, "-c", CHILD, mode, str(path), str(ready), str(go), tag, *extra]
        child = subprocess.Popen(
            argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        children.append((child, ready))
    deadline = time.monotonic() + 30
    while not all(ready.exists() for _, ready in children):
        assert time.monotonic() < deadline, "children never got ready"
        assert all(child.poll() is None for child, _ in children), [c.communicate() for c, _ in children]
        time.sleep(0.01)
    go.touch()
    reports = []
    for child, _ in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert "locked" not in err
        reports.append(json.loads(out))
    return reports
