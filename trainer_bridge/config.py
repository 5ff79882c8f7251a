"""`BridgeConfig`: how a run of the steering core (`bridge.Bridge`) is served, stored and steered: its
control server's address and token, its store and run record, replay and resume, and what it measures.
Every adapter (`selfsteer.integrations`), the recipe runner and `selfsteer.attach` build one."""

from __future__ import annotations

import os
from dataclasses import dataclass

from selfsteer.trainer_bridge.store import DEFAULT_DB_PATH


@dataclass
class BridgeConfig:
    host: str = "127.0.0.1"
    port: int | None = 7007  # None: no control server (replays, scripts); 0: any free port
    token: str | None = None  # bearer token; required when serving on anything but loopback
    db: str | os.PathLike = DEFAULT_DB_PATH
    run_name: str = "run"
    run_kind: str = "train"
    run_config: dict | None = None  # what a replay needs to rebuild the run (the recipe)
    parent_run_id: str | None = None
    checkpoint_dir: str | None = None  # default: <output_dir>/bridge-checkpoints
    poll_s: float = 0.05  # how often a paused run looks for new commands
    event_interval_s: float = 0.5  # metrics reach WebSocket subscribers in batches this far apart
    auto_finish: bool = True  # finish the run in the store when training ends
    replay_of: str | None = None  # apply this run's journaled commands at their steps
    # Continue this run (crashed, failed or stopped) from the Trainer checkpoint `resume_checkpoint`:
    # same run id, journal and metrics; the steps from the checkpoint on go to a new branch.
    resume_run_id: str | None = None
    resume_checkpoint: dict | None = None  # a journaled Trainer save: {name, path, step, branch, ...}
    # Say on stderr where the run is served, once it accepts connections (a library run would otherwise
    # keep its URL to itself; the command line prints its own).
    announce: bool = True
    # The dashboard's built folder (index.html, assets/) served at `/`; None: the installed dashboard's.
    static_dir: str | os.PathLike | None = None
    # Hold at the first boundary (step 0) until a `resume`: a supervisor or a person looks first.
    start_paused: bool = False
    # An in-memory copy of the run before its first step (the weights; the optimizer holds no state yet),
    # from which a probe can train restart arms: a start found too high, measured from the start again.
    # None: kept when the trained parameters are few enough for update_alignment's auto rule (50M).
    keep_start: bool | None = None
    # Log `update_alignment` every optimizer step: the cosine between the step's gradient and the previous
    # step's update, reversed (the hypergradient's sign; trainer_bridge/alignment.py). Costs one float32
    # copy of the trained parameters (on every rank) and a copy, a subtraction and a dot product a step.
    # None (default): on while the optimizer trains at most bridge.ALIGNMENT_AUTO_MAX_PARAMS parameters (a 1B
    # model would pay 4 GB of memory unasked); True or False decides.
    update_alignment: bool | None = None
