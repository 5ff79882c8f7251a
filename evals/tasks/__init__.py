"""Tasks for the self-correction loop: each is `load(split, n, seed) -> list[Problem]`, and each problem
carries `validate(answer) -> Verdict`.

    from selfsteer.evals.tasks import load_task
    problems = load_task("countdown", split="test", n=50, seed=0)
    problems[0].validate("(3 + 5) * 2")       # Verdict(passed=..., reason=...)

Names: `countdown` (3 to 5 numbers), `countdown:N` (N numbers, 2 to 5), `bfcl:CATEGORY` (simple_python, multiple, parallel, parallel_multiple; the live_*
categories are held out, test split only), `decisions:DIR` (a supervisor's lr decisions over the
counterfactual rows collected in DIR; its loader takes `policy`, the supervisor whose decisions are the
first tries), or `module:function` for your own loader.
"""

from __future__ import annotations

import importlib
import inspect

from selfsteer.evals.tasks import bfcl, countdown, decisions
from selfsteer.tools.tasks import SPLITS, Problem, TaskLoader, Verdict, split_of

# name -> its loader, or "module:function" (imported when first asked for: one line registers a task)
TASKS: dict[str, TaskLoader | str] = {
    "countdown": countdown.load,
    **{f"countdown:{count}": countdown.loader(count) for count in countdown.LEVELS},
    **{f"bfcl:{category}": bfcl.loader(category) for category in bfcl.CATEGORIES},
}


def register(name: str, loader: TaskLoader | str) -> None:
    TASKS[name] = loader


def get_loader(name: str) -> TaskLoader:
    """The loader of a registered task, or of `module:function` (a function with the loader signature)."""
    if isinstance(TASKS.get(name), str):
        return _import_loader(name, TASKS[name])
    if name in TASKS:
        return TASKS[name]
    module_name, _, attribute = name.partition(":")
    if module_name == "decisions" and attribute:
        return decisions.loader(attribute)
    if not attribute or module_name in ("bfcl", "countdown", "decisions"):
        known = ", ".join(sorted(TASKS))
        raise ValueError(f"unknown task {name!r}: use one of {known}, or module:function")
    return _import_loader(name, name)


def _import_loader(name: str, target: str) -> TaskLoader:
    module_name, _, attribute = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load task {name!r}: {error}") from error


def takes_option(name: str, option: str) -> bool:
    """Whether the task's loader takes the keyword `option` (bfcl takes `call_mode`, "tools" or "text";
    decisions takes `policy`; loaders written without one never get it)."""
    loader = get_loader(name)
    try:
        parameters = inspect.signature(loader).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == option or p.kind is p.VAR_KEYWORD for p in parameters)


def takes_call_mode(name: str) -> bool:
    return takes_option(name, "call_mode")


def load_task(
    name: str,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    *,
    call_mode: str | None = None,
    policy: str | None = None,
    feedback: bool | None = None,
) -> list[Problem]:
    """The problems of a task. `call_mode`, `policy` and `feedback` go to loaders that take them (see
    `takes_option`); for the others they are ignored. None: the loader's own default (bfcl: "text", no
    feedback; decisions: the shipped intervener)."""
    given = {"call_mode": call_mode, "policy": policy, "feedback": feedback}
    options = {k: v for k, v in given.items() if v is not None and takes_option(name, k)}
    problems = list(get_loader(name)(split=split, n=n, seed=seed, **options))
    for problem in problems:
        if not isinstance(problem, Problem):
            raise TypeError(f"task {name!r} returned {type(problem).__name__}, not a Problem")
    return problems


__all__ = [
    "SPLITS",
    "TASKS",
    "Problem",
    "TaskLoader",
    "Verdict",
    "get_loader",
    "load_task",
    "register",
    "split_of",
    "takes_call_mode",
    "takes_option",
]
