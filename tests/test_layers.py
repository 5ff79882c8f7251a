"""Dependencies point one way (docs: DESIGN.md, "Layout"): a module imports only its own layer or lower ones.

    trainer_bridge, prompts  (0)  ->  tools (1)  ->  agents (2)  ->  graphs (3)  ->  evals, cli, dashboard (4)

and graphs reach the live run only through tools: of trainer_bridge, graphs import only the persistence
every layer shares (the store, `trainer_bridge.store`, and the records, `trainer_bridge.records`).
`dashboard` (static files and Chromium settings) is the top layer: only evals and cli import it.

Every `import` and `from ... import` is read with `ast`, at the top of a module and inside functions alike.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "trainer_bridge": 0,
    "integrations": 0,  # selfsteer.integrations: the folder trainer_bridge/integrations (the core's adapters)
    "prompts": 0,
    "tools": 1,
    "agents": 2,
    "graphs": 3,
    "evals": 4,
    "cli": 4,
    "dashboard": 4,
}
CHECKED = ("agents", "graphs", "tools", "trainer_bridge", "prompts", "evals", "cli")
# What graphs may take from trainer_bridge: the persistence every layer shares, not the live run.
SHARED_PERSISTENCE = ("selfsteer.trainer_bridge.store", "selfsteer.trainer_bridge.records")

# Exceptions, as "file:selfsteer.package.module". None: keep it that way.
ALLOWED: set[str] = set()


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute dotted name) for every name a file imports: `import a.b` gives a.b, `from a.b
    import c` gives a.b.c (c may be a module or a name in one); a relative import is resolved against
    the file's package."""
    package = ["selfsteer", *path.relative_to(root).parent.parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def layer_of(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    if parts[0] != "selfsteer" or len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return parts[1], LAYERS[parts[1]]


def violations() -> list[tuple[str, str]]:
    """(file:line what, the allow-list key) of every import against the direction."""
    out = []
    for folder in CHECKED:
        own = LAYERS[folder]
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            for line, module in imported_modules(path):
                target = layer_of(module)
                if target is None:
                    continue
                name, layer = target
                if layer > own:
                    why = f"{folder} (layer {own}) imports {module} ({name}, layer {layer})"
                elif (
                    folder == "graphs"
                    and name == "trainer_bridge"
                    and not module.startswith(SHARED_PERSISTENCE)
                ):
                    why = f"graphs reach the live run through tools, not {module} (store and records only)"
                else:
                    continue
                out.append((f"{relative}:{line}: {why}", f"{relative}:{'.'.join(module.split('.')[:3])}"))
    return out


def test_imports_point_down():
    found = violations()
    bad = [where for where, key in found if key not in ALLOWED]
    assert not bad, "imports against the layers (DESIGN.md, Layout):\n" + "\n".join(bad)


def test_the_checker_sees_imports_everywhere(tmp_path):
    """Top level, inside functions, `from selfsteer import x`, relative imports: all seen."""
    probe = tmp_path / "graphs" / "probe.py"
    probe.parent.mkdir()
    probe.write_text(
        "from selfsteer import evals\n"
        "def f():\n"
        "    from selfsteer.cli import main\n"
        "    import selfsteer.dashboard\n"
        "    from ..trainer_bridge import client\n"
        "    from selfsteer.trainer_bridge.records import ACTIONS\n"
    )
    modules = [module for _, module in imported_modules(probe, root=tmp_path)]
    assert modules == [
        "selfsteer.evals",
        "selfsteer.cli.main",
        "selfsteer.dashboard",
        "selfsteer.trainer_bridge.client",
        "selfsteer.trainer_bridge.records.ACTIONS",
    ]


# The folders the install ships (pyproject's [tool.setuptools.package-dir]): no test helper may live in or
# be needed by them. Test helpers live in tests/helpers, imported by tests as `helpers.X` (pytest puts
# tests/ on sys.path) or launched by path: neither `tests` nor `helpers` exists in an installed selfsteer.
SHIPPED = ("selfsteer", "agents", "cli", "dashboard", "evals", "graphs", "prompts", "tools", "trainer_bridge")
TEST_ONLY = ("tests", "helpers")


def package_dirs() -> set[str]:
    """The top-level folders that pyproject maps under `selfsteer.*`."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return {folder.split("/")[0] for folder in config["tool"]["setuptools"]["package-dir"].values()}


def helper_uses(root: Path = ROOT) -> list[str]:
    """file:line what, for every shipped module that imports from `tests` or `helpers`, and every one
    named testing*.py (a test helper shipped in the package)."""
    out = []
    for folder in SHIPPED:
        for path in sorted((root / folder).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if path.name.startswith("testing"):
                out.append(f"{relative}: a test helper in the shipped package (its place: tests/helpers)")
            out += [
                f"{relative}:{line}: imports {module}, which only a checkout's tests have"
                for line, module in imported_modules(path, root)
                if module.split(".")[0] in TEST_ONLY
            ]
    return out


def test_the_shipped_package_holds_no_test_helpers():
    assert package_dirs() == set(SHIPPED), "SHIPPED is out of step with pyproject's package-dir"
    bad = helper_uses()
    assert not bad, "test helpers in, or imported by, the shipped package:\n" + "\n".join(bad)


def test_the_helper_checker_sees_them(tmp_path):
    """An import of `helpers` or `tests`, at the top or inside a function, and a testing*.py: all seen."""
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "bench.py").write_text(
        "import helpers\n"
        "def f():\n"
        "    from helpers.live_run import LiveRun\n"
        "    import tests.helpers.live_run\n"
        "    from selfsteer.trainer_bridge.client import BridgeClient\n"
    )
    (tmp_path / "trainer_bridge").mkdir()
    (tmp_path / "trainer_bridge" / "testing_ddp.py").write_text("import json\n")
    assert helper_uses(root=tmp_path) == [
        "evals/bench.py:1: imports helpers, which only a checkout's tests have",
        "evals/bench.py:3: imports helpers.live_run.LiveRun, which only a checkout's tests have",
        "evals/bench.py:4: imports tests.helpers.live_run, which only a checkout's tests have",
        "trainer_bridge/testing_ddp.py: a test helper in the shipped package (its place: tests/helpers)",
    ]
