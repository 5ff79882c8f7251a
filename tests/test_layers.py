"""Dependencies point one way (docs: README.md, "Layout"): a module imports only its own layer or lower ones.

    trainer_bridge, prompts  (0)  ->  tools (1)  ->  agents (2)  ->  graphs (3)  ->  evals, cli, dashboard (4)

and graphs reach the live run only through tools: of trainer_bridge, graphs import only the persistence
every layer shares (the store, `trainer_bridge.store`, and the records, `trainer_bridge.records`).
`dashboard` (static files and Chromium settings) is the top layer: only evals and cli import it. The front
door, the folder `selfsteer` (`selfsteer.attach` and friends), names entry points of trainer_bridge and
integrations only, so it sits at the bottom with them.

Every `import` and `from ... import` is read with `ast`, at the top of a module, inside functions and
under `if TYPE_CHECKING:` alike; a file's module name comes from pyproject's package-dir (so
trainer_bridge/integrations/plain.py is `selfsteer.integrations.plain`). Besides the direction, the
modules' import graph must have no cycle (an import cycle is hidden, not removed, by a lazy import).
"""

from __future__ import annotations

import ast
import os
import re
import tokenize
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "selfsteer": 0,  # the front door (the folder selfsteer/): `import selfsteer`, `selfsteer.attach`
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
# The folders whose files are checked (subfolders included): every top-level folder the install ships.
CHECKED = ("selfsteer", "agents", "graphs", "tools", "trainer_bridge", "prompts", "evals", "cli", "dashboard")
# What graphs may take from trainer_bridge: the persistence every layer shares, not the live run.
SHARED_PERSISTENCE = ("selfsteer.trainer_bridge.store", "selfsteer.trainer_bridge.records")
# Never read: the dashboard's npm packages and byte-code caches.
SKIPPED_DIRS = {"node_modules", "__pycache__"}

# Exceptions, as "file:selfsteer.package.module". None: keep it that way.
ALLOWED: set[str] = set()


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


# folder (relative to the repository) -> the package it is installed as: pyproject's package-dir, inverted.
PACKAGE_OF_FOLDER = {
    folder: package for package, folder in _pyproject()["tool"]["setuptools"]["package-dir"].items()
}


def source_files(folder: str, root: Path = ROOT) -> list[Path]:
    """Every .py file under root/folder, subfolders included, the dashboard's node_modules left out."""
    return sorted(
        path
        for path in (root / folder).rglob("*.py")
        if not SKIPPED_DIRS.intersection(path.relative_to(root).parts)
    )


def module_name(path: Path, root: Path = ROOT) -> str:
    """The dotted name a file is imported as: the longest folder of pyproject's package-dir that holds it
    gives the package (a folder not listed there: `selfsteer.` + its path); __init__.py is the package."""
    parts = path.relative_to(root).with_suffix("").parts
    for cut in range(len(parts) - 1, 0, -1):
        package = PACKAGE_OF_FOLDER.get("/".join(parts[:cut]))
        if package is not None:
            name = [*package.split("."), *parts[cut:]]
            break
    else:
        name = ["selfsteer", *parts]
    return ".".join(name[:-1] if name[-1] == "__init__" else name)


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute dotted name) for every name a file imports: `import a.b` gives a.b, `from a.b
    import c` gives a.b.c (c may be a module or a name in one); a relative import is resolved against
    the file's package."""
    module = module_name(path, root).split(".")
    package = module if path.name == "__init__.py" else module[:-1]
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
    """(folder, layer) of a selfsteer module; `selfsteer` itself and `selfsteer.attach` and the like (a
    name the front door exports) are the front door's. None for what is not selfsteer's."""
    parts = module.split(".")
    if parts[0] != "selfsteer":
        return None
    folder = parts[1] if len(parts) > 1 and parts[1] in LAYERS else "selfsteer"
    return folder, LAYERS[folder]


def violations() -> list[tuple[str, str]]:
    """(file:line what, the allow-list key) of every import against the direction."""
    out = []
    for folder in CHECKED:
        own = LAYERS[folder]
        for path in source_files(folder):
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
    assert not bad, "imports against the layers (README.md, Layout):\n" + "\n".join(bad)


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
        for path in source_files(folder, root):
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


def test_every_folder_and_subpackage_is_checked_and_installed():
    """The layer check reads every folder the install ships; each folder under them that holds Python is a
    package (an __init__.py) that pyproject lists, so a new subpackage cannot be left out of the wheel."""
    assert set(CHECKED) == package_dirs(), "CHECKED is out of step with pyproject's package-dir"
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    folders = {path.parent for folder in CHECKED for path in source_files(folder)}
    missing = [
        f"{folder.relative_to(ROOT).as_posix()}/ ({module_name(folder / '__init__.py')}): "
        + ("no __init__.py" if not (folder / "__init__.py").exists() else "not in pyproject's packages")
        for folder in sorted(folders)
        if not (folder / "__init__.py").exists() or module_name(folder / "__init__.py") not in listed
    ]
    assert not missing, "folders with Python that the install would leave out:\n" + "\n".join(missing)


# Import cycles between modules (strongly connected components of the import graph below), each hidden
# today by a lazy (function-local) or `if TYPE_CHECKING:` import. They are to be removed (issue 27): this
# list may only shrink. A cycle not listed fails the test, and so does a listed one that is gone (or that
# has changed: a module joined or left it).
KNOWN_CYCLES: frozenset[frozenset[str]] = frozenset(
    frozenset(f"selfsteer.{name}" for name in cycle)
    for cycle in (
        # the steering core: the bridge imports handlers and server lazily, handlers import the Bridge,
        # the server names it under TYPE_CHECKING (the command set and its helpers take a `loop.StepContext`,
        # a leaf, and are out of it)
        (
            "trainer_bridge.bridge",
            "trainer_bridge.handlers",
            "trainer_bridge.server",
        ),
    )
)


def import_graph(root: Path = ROOT, folders: tuple[str, ...] = CHECKED) -> dict[str, set[str]]:
    """module -> the selfsteer modules it imports, from every import statement (top level, in functions,
    under TYPE_CHECKING). `from a.b import c` is an edge to a.b.c when that is a module, else to a.b:
    each imported name goes to the longest module that prefixes it."""
    files = {module_name(path, root): path for folder in folders for path in source_files(folder, root)}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets = graph.setdefault(module, set())
        for _, imported in imported_modules(path, root):
            parts = imported.split(".")
            while parts and ".".join(parts) not in files:
                parts.pop()
            if parts and ".".join(parts) != module:
                targets.add(".".join(parts))
    return graph


def import_cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: set[frozenset[str]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.add(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _describe(cycle: frozenset[str]) -> str:
    return "{" + ", ".join(sorted(cycle)) + "}"


def test_no_import_cycles_but_the_known_ones():
    found = import_cycles(import_graph())
    new = sorted(_describe(cycle) for cycle in found - KNOWN_CYCLES)
    gone = sorted(_describe(cycle) for cycle in KNOWN_CYCLES - found)
    assert not new, "import cycles between modules (break them; do not list them):\n" + "\n".join(new)
    assert not gone, "cycles in KNOWN_CYCLES that no longer exist (remove them from the list):\n" + "\n".join(
        gone
    )


def test_the_cycle_finder_sees_lazy_and_type_checking_imports(tmp_path):
    """A cycle closed by a function-local import, one closed under TYPE_CHECKING, one through a package's
    __init__ and a `from package import module`: all found; an import of a name, not a module, and a
    chain without a way back are not cycles."""
    files = {
        "agents/a.py": "from selfsteer.agents.b import B\n",
        "agents/b.py": "def f():\n    from selfsteer.agents.a import A\n",
        "tools/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from selfsteer.graphs import d\n",
        "graphs/__init__.py": "",
        "graphs/d.py": "import selfsteer.tools.c\n",
        "evals/__init__.py": "from selfsteer.evals.e import run\n",
        "evals/e.py": "import selfsteer.evals\nfrom selfsteer.agents.a import A\n",
        "cli/f.py": "from selfsteer.agents.b import B\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, folders=("agents", "tools", "graphs", "evals", "cli"))
    assert graph["selfsteer.graphs.d"] == {"selfsteer.tools.c"}
    assert graph["selfsteer.evals"] == {"selfsteer.evals.e"}  # `run` is a name in e, the edge goes to e
    assert import_cycles(graph) == {
        frozenset({"selfsteer.agents.a", "selfsteer.agents.b"}),
        frozenset({"selfsteer.tools.c", "selfsteer.graphs.d"}),
        frozenset({"selfsteer.evals", "selfsteer.evals.e"}),
    }


# A `# fmt: skip` keeps a statement out of the formatter's layout; the comment before it on its line says
# why (`)  # one row per workload # fmt: skip`). Every .py file of the repository, tests included.
FMT_SKIP = re.compile(r"#\s*fmt:\s*skip\s*$")


def repository_files(root: Path = ROOT) -> Iterator[Path]:
    """Every .py file of the repository, tests included (.venv, node_modules, dot folders and byte-code
    caches left out), in a stable order."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in {*SKIPPED_DIRS, ".venv"} and not d.startswith("."))
        yield from (Path(folder) / name for name in sorted(f for f in files if f.endswith(".py")))


def unexplained_fmt_skips(root: Path = ROOT) -> list[str]:
    """file:line of every `# fmt: skip` comment with no reason before it. Comments only, read with
    `tokenize`: a string that holds one is none."""
    found = []
    for path in repository_files(root):
        with path.open("rb") as source:
            for token in tokenize.tokenize(source.readline):
                skips = token.type == tokenize.COMMENT and FMT_SKIP.search(token.string)
                if skips and not FMT_SKIP.sub("", token.string).strip("# \t"):
                    found.append(f"{path.relative_to(root).as_posix()}:{token.start[0]}")
    return found


def test_every_fmt_skip_says_why():
    bare = unexplained_fmt_skips()
    why = "a `# fmt: skip` without a reason (write `# why # fmt: skip`, or let ruff format it):\n"
    assert not bare, why + "\n".join(bare)


def test_the_fmt_skip_checker_wants_a_reason(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "bare.py").write_text("x = f(\n    1, 2,\n)  # fmt: skip\ny = [1,  2]  #fmt:skip\n")
    (tmp_path / "pkg" / "why.py").write_text(
        'x = f(\n    1, 2,\n)  # packed args # fmt: skip\ns = ")  # fmt: skip"  # a string, not a comment\n'
    )
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "lib.py").write_text("x = 1  # fmt: skip\n")
    assert unexplained_fmt_skips(tmp_path) == ["pkg/bare.py:3", "pkg/bare.py:4"]


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 700, 120


def oversized(root: Path = ROOT) -> list[str]:
    """Every .py file over MAX_MODULE_LINES lines and every function over MAX_FUNCTION_LINES (issue 27's
    goal: a reader takes in a module, and a function, top to bottom)."""
    found = []
    for path in repository_files(root):
        text, where = path.read_text(encoding="utf-8"), path.relative_to(root).as_posix()
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            found.append(f"{where}: {lines} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if (size := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                found.append(f"{where}:{node.lineno} {node.name}: {size} lines")
    return found


def test_every_module_and_function_is_short_enough():
    assert not oversized(), "\n".join(oversized())


def test_the_size_checker_sees_long_modules_and_functions(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long_function.py").write_text(f"def long():\n{body}\n")
    (tmp_path / "long_module.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    (tmp_path / "fine.py").write_text("x = 1\n" * MAX_MODULE_LINES)
    assert oversized(tmp_path) == ["long_function.py:1 long: 121 lines", "long_module.py: 701 lines"]
