"""The README's tour: the four diffs a stranger writes (a supervisor, a prompt strategy, a task, a loop
integration), each one new file plus its registration line, run as written. Each new file is written to a
temporary folder under a module name of its own (nothing is added to the package), and the registration
line is applied to the registry it names, pointing at that module."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import torch

import selfsteer
from selfsteer.agents.observation import Observation
from selfsteer.agents.registry import BUILT_IN, make_supervisor
from selfsteer.evals.tasks import TASKS, load_task
from selfsteer.prompts import load_strategy
from selfsteer.trainer_bridge.store import Store

README = Path(__file__).resolve().parents[1] / "README.md"


def tour() -> dict[str, str]:
    """The tour's code blocks by their first line ("# new file: PATH" or "# register in PATH, ...")."""
    text = README.read_text(encoding="utf-8")
    start = text.index("**The diffs a stranger writes**")
    section = text[start : text.index("Both loops open in LangGraph Studio", start)]
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", section, re.S)
    return {block.splitlines()[0]: "\n".join(block.splitlines()[1:]) + "\n" for block in blocks}


@pytest.fixture
def blocks(tmp_path, monkeypatch) -> dict[str, str]:
    """The tour's blocks; each new Python file importable as `tour_<path>`, which the registration lines
    then name instead of its place in the package."""
    found = tour()
    monkeypatch.syspath_prepend(str(tmp_path))
    renamed: dict[str, str] = {}
    for header, body in found.items():
        path = header.removeprefix("# new file: ")
        if header.startswith("# new file: ") and path.endswith(".py"):
            module = "tour_" + path.removesuffix(".py").replace("/", "_")
            (tmp_path / f"{module}.py").write_text(body)
            package = "selfsteer." + path.removesuffix(".py").replace("/", ".")
            renamed[package.replace("selfsteer.trainer_bridge.integrations", "selfsteer.integrations")] = (
                module
            )
    for header, body in found.items():
        if header.startswith("# register in "):
            for package, module in renamed.items():
                body = body.replace(f'"{package}', f'"{module}')
            found[header] = body
    yield found
    for module in renamed.values():
        sys.modules.pop(module, None)


def registered(blocks: dict[str, str], where: str) -> tuple[str, str]:
    """The (name, target) pair of the registration line in `where`."""
    [line] = [body for header, body in blocks.items() if header.startswith(f"# register in {where}")]
    [(name, target)] = ast.literal_eval("{" + line.strip().rstrip(",") + "}").items()
    return name, target


def test_the_tour_has_four_new_files_and_three_registration_lines():
    headers = list(tour())
    assert [h for h in headers if h.startswith("# new file: ")] == [
        "# new file: agents/cautious.py",
        "# new file: prompts/lr_short_trend.yaml",
        "# new file: evals/tasks/parity.py",
        "# new file: trainer_bridge/integrations/step_hook.py",
    ]
    registrations = [h for h in headers if h.startswith("# register in ")]
    assert len(registrations) == 3 and all(len(tour()[h].strip().splitlines()) == 1 for h in registrations)


def test_a_supervisor_in_one_file_and_one_line(blocks, monkeypatch):
    name, target = registered(blocks, "agents/registry.py")
    monkeypatch.setitem(BUILT_IN, name, target)
    supervisor = make_supervisor("cautious")
    rising = Observation(step=20, lr=0.1, eval_loss=[(10, 2.0), (20, 2.4)])
    falling = Observation(step=20, lr=0.1, eval_loss=[(10, 2.4), (20, 2.0)])
    assert supervisor.decide(rising).action == "halve" and supervisor.decide(falling).action == "keep"


def test_a_prompt_strategy_in_one_file(blocks, tmp_path):
    path = tmp_path / "lr_short_trend.yaml"
    path.write_text(blocks["# new file: prompts/lr_short_trend.yaml"])
    strategy = load_strategy(str(path))
    observation = Observation(step=20, lr=0.1, max_steps=100, eval_loss=[(10, 2.0), (20, 2.4)])
    user = strategy.render_user(**observation.prompt_values())
    assert strategy.id.startswith("short_trend") and "Step 20 of 100, learning rate 0.1" in user


def test_a_task_in_one_file_and_one_line(blocks, monkeypatch):
    name, target = registered(blocks, "evals/tasks/__init__.py")
    monkeypatch.setitem(TASKS, name, target)
    test, train = load_task("parity", split="test"), load_task("parity", split="train", n=5)
    assert test and len(train) == 5 and not {p.id for p in test} & {p.id for p in train}
    problem = test[0]
    numbers = [int(n) for n in re.findall(r"\d+", problem.prompt)]
    right = "even" if sum(numbers) % 2 == 0 else "odd"
    assert problem.validate(right).passed and not problem.validate("maybe").passed


def test_a_loop_integration_in_one_file_and_one_line(blocks, monkeypatch, tmp_path, one_torch_thread):
    name, target = registered(blocks, "selfsteer/__init__.py")
    monkeypatch.setitem(selfsteer._EXPORTS, name, target)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    hook = selfsteer.StepHook(model, optimizer, max_steps=50, port=None, db=tmp_path / "s.sqlite")
    hook.begin()
    lrs, step = [], 0
    for step in range(1, 51):
        x = torch.randn(8, 4)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(-1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 3:
            hook.bridge.submit("set_optimizer", {"lr": 0.05}, source="tour")
        if step == 6:
            hook.bridge.submit("stop", {}, source="tour")
        lrs.append(optimizer.param_groups[0]["lr"])
        if hook.after_step(step, loss.item()):
            break
    run_id = hook.bridge.run_id
    hook.end(step)
    assert step == 6 and lrs[:3] == [0.01] * 3 and lrs[3:] == [0.05] * 3  # applied at the next step
    with Store(tmp_path / "s.sqlite") as store:
        assert store.get_run(run_id)["status"] == "stopped"
        losses = store.get_metrics(run_id, names=["loss"])
        assert [m["step"] for m in losses] == [1, 2, 3, 4, 5, 6]
