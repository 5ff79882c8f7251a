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


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the Ray files (they share one xdist group, so one worker): a start and a
    shutdown cost about 5 s each, paid once instead of per fixture. One CPU: Tune then trains one
    trial at a time in one worker process; a second worker process pays its own ~10 s of imports, which
    on this 2-core machine cost PBT more than it saved (87 s on 3 CPUs, 54 s on one) and gained the
    other Ray files nothing."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(session, config, items):
    """Two items with one node id would run serially, but pytest-xdist schedules by node id and runs
    only one of them (412 of 413 once, silently): refuse them at collection."""
    seen: set[str] = set()
    twice = sorted({item.nodeid for item in items if item.nodeid in seen or seen.add(item.nodeid)})
    if twice:
        raise pytest.UsageError(f"tests sharing a node id: {twice}")
    # Under `--dist loadgroup` a file's tests stay on one worker, so its module fixtures (a model, a
    # server, a PBT population) are set up once; the Ray files share one group, since two Ray clusters
    # starting at once on two cores made test_pbt's setup 3-5x slower than serially. xdist 3.8 groups
    # by an "@group" suffix it writes to `item._nodeid`, which pytest 9 no longer reads (its node id is
    # `_id`): every group was split over both workers and each module fixture set up on each (PBT's
    # population twice, 88 s). So the suffix is written here, where pytest 9 reads it.
    if getattr(config.option, "loadgroup", False):
        from _pytest.nodeid import coerce_node_id

        groups = {}
        for item in items:
            module = item.nodeid.split("::", 1)[0]
            group = "ray" if module in RAY_MODULES else module.rsplit("/", 1)[-1].removesuffix(".py")
            groups[item] = group
            item._id = coerce_node_id(f"{item.nodeid}@{group}")
        # Longest first (LPT): xdist hands out groups in this order, so the Ray group (about a third of
        # the suite's time, on one worker) starts at once instead of after the groups with the most
        # tests, and the short files fill in around it at the end.
        items.sort(
            key=lambda item: SLOWEST_FIRST.index(groups[item]) if groups[item] in SLOWEST_FIRST else 99
        )


RAY_MODULES = {"tests/test_pbt.py", "tests/test_lr_suite_ray.py", "tests/test_counterfactual_ray.py"}
# The slowest groups, slowest first (junit times of a full run on 2 cores); the rest keep their order.
SLOWEST_FIRST = [
    "ray", "test_intervener", "test_local_llm", "test_train_supervised", "test_dashboard", "test_bridge_ddp",
    "test_serve_llm", "test_fuzz_serve_llm", "test_listen_before_announce", "test_exactly_once", "test_cli",
    "test_fuzz_api", "test_reflect_grpo", "test_decisions_task", "test_supervise_graph", "test_counterfactual",
    "test_self_correct", "test_local_chat_tools", "test_plain_loop_ddp", "test_crash_recovery",
]  # slowest first, a few per line # fmt: skip


def pytest_configure(config):
    """Under pytest-xdist (`-n 2` on the 2-core test machine) the workers share the cores: each worker,
    and each process its tests start, runs torch on its share of them (one thread there), as
    `one_torch_thread` does for a module, instead of every worker spinning up a thread per core."""
    # xdist would reorder the groups by their number of tests; they go in the order set above instead.
    config.option.loadscopereorder = False
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
