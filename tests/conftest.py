import os

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that run the model: measured on the shared 2-core test machine, with other jobs
    running two torch threads made generation several times slower than one (threads spin-waiting on
    each other's cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(session, config, items):
    """Two items with one node id would run serially, but pytest-xdist schedules by node id and runs
    only one of them (412 of 413 once, silently): refuse them at collection."""
    seen: set[str] = set()
    twice = sorted({item.nodeid for item in items if item.nodeid in seen or seen.add(item.nodeid)})
    if twice:
        raise pytest.UsageError(f"tests sharing a node id: {twice}")
    # Under `--dist loadgroup` a file's tests stay on one worker, so its module fixtures (a model, a
    # server) load once; the Ray files share one group, since two Ray clusters starting at once on
    # two cores made test_pbt's setup 3-5x slower than serially.
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        group = "ray" if module in RAY_MODULES else module
        item.add_marker(pytest.mark.xdist_group(group))


RAY_MODULES = {"tests/test_pbt.py", "tests/test_lr_suite_ray.py", "tests/test_counterfactual_ray.py"}


def pytest_configure(config):
    """Under pytest-xdist (`-n 2` on the 2-core test machine) the workers share the cores: each worker,
    and each process its tests start, runs torch on its share of them (one thread there), as
    `one_torch_thread` does for a module, instead of every worker spinning up a thread per core."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
