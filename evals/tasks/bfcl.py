"""Function calling from the Berkeley Function Calling Leaderboard data (the `bfcl-eval` package).

The prompt lists the functions (their JSON documentation) and the user's request; the model answers
with the call(s), as JSON (`[{"name": ..., "arguments": {...}}]`) or Python call syntax
(`[f(a=1), g(b="x")]`). The validator works like the leaderboard's AST checker: the function name,
every required parameter, the type of each value, each value one of the acceptable ones from
`possible_answer` ("" among them marks an optional parameter that may be left out), no parameter that
is not in the answer key, and parallel calls matched in any order.

Two call modes. `text` (the default of `load`): the prompt lists the functions and the model writes the
calls as text, as above. `tools` (the leaderboard's FC mode): the functions are offered as OpenAI tools
(BFCL's types mapped to JSON schema, names OpenAI refuses such as `math.factorial` mapped to
`math_factorial`), the prompt is the user's request alone, and the answer is the JSON rendering of the
model's tool calls (`[{"name": ..., "arguments": {...}}]`), whose names are mapped back before the same
checker runs; an answer without a call fails ("no function call").

Only the data files are read (found with importlib, without importing bfcl_eval's own modules, which
pull in every model SDK). Develop and train on `simple_python`, `multiple`, `parallel` and
`parallel_multiple`; the `live_*` categories are held out: they load for the test split only.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
import re
from dataclasses import replace
from functools import cache, partial
from pathlib import Path
from typing import Any

from selfsteer.tools.tasks import CALL_MODES, Problem, Verdict, check_split, split_of

TRAIN_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple")
HELD_OUT_CATEGORIES = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
CATEGORIES = TRAIN_CATEGORIES + HELD_OUT_CATEGORIES

SYSTEM = (
    "You call functions. Reply only with the function call(s) in Python syntax, with keyword arguments, "
    'e.g. [get_weather(city="Paris", unit="celsius")]. Several calls go in one list.'
)
PROMPT = "Functions:\n{functions}\n\nRequest: {request}"
TOOLS_SYSTEM = (
    "You call functions. Answer the user's request by calling the functions you are given, with the values "
    "the request states. Make several calls if the request asks for several things."
)
# Every item of the categories loaded here expects at least one call (the leaderboard's irrelevance
# categories, where no call is right, are not among them), so a tools-mode problem requires a call.
TOOL_CHOICE = "required"

_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": object,
}


class CallParseError(ValueError):
    """The answer holds no function call in a form we read."""


# -----------------------------------------------------------------------------
# data


def data_dir() -> Path:
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the BFCL data is not installed: pip install --no-deps bfcl-eval")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@cache
def _records(category: str) -> tuple[tuple[dict, list], ...]:
    """(question record, ground truth) pairs of a category, in file order."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown BFCL category {category!r}; known: {', '.join(CATEGORIES)}")
    root = data_dir()

    def read(path: Path) -> dict[str, dict]:
        with path.open() as file:
            return {row["id"]: row for row in map(json.loads, filter(str.strip, file))}

    questions = read(root / f"BFCL_v4_{category}.json")
    answers = read(root / "possible_answer" / f"BFCL_v4_{category}.json")
    return tuple((q, answers[key]["ground_truth"]) for key, q in questions.items() if key in answers)


def loader(category: str):
    """The task loader of one category (what the registry holds for `bfcl:CATEGORY`)."""
    return partial(load, category)


def load(
    category: str,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    call_mode: str = "text",
    feedback: bool = False,
) -> list[Problem]:
    """Problems of a category. The train categories are split 80/20 by a hash of the item id; the
    held-out live_* categories exist only as test data, whole. `call_mode`: "text" (functions listed in
    the prompt, calls written as text) or "tools" (functions offered as OpenAI tools). `feedback`: the
    reflection and the plain retry are told what failed (prompts/reflect_feedback.yaml), and so a failed
    verdict's reason leaves the answer key out (`without_answer_key`)."""
    check_split(split)
    check_call_mode(call_mode)
    if category in HELD_OUT_CATEGORIES:
        if split != "test":
            raise ValueError(f"bfcl:{category} is held out for evaluation: load it with split='test'")
        records = list(_records(category))
    else:
        records = [r for r in _records(category) if split_of(r[0]["id"]) == split]
    if n is not None and n < len(records):
        records = random.Random(f"bfcl-{category}-{seed}").sample(records, n)
    problems = [make_problem(question, truth, category, call_mode) for question, truth in records]
    if feedback:
        problems = [replace(p, validate=_keyless(p.validate), prompts="feedback") for p in problems]
    return problems


def _keyless(validate):
    def check(answer: str) -> Verdict:
        verdict = validate(answer)
        return verdict if verdict.passed else Verdict.fail(without_answer_key(verdict.reason))

    return check


def check_call_mode(call_mode: str) -> str:
    if call_mode not in CALL_MODES:
        raise ValueError(f"call_mode must be one of {CALL_MODES}, not {call_mode!r}")
    return call_mode


def make_problem(question: dict, ground_truth: list[dict], category: str, call_mode: str = "text") -> Problem:
    functions = question["function"]
    turns = question["question"][0]
    request = "\n".join(m["content"] for m in turns if m["role"] == "user")
    if check_call_mode(call_mode) == "tools":
        tools, names = openai_tools(functions)
        return Problem(
            id=question["id"],
            prompt=request,
            validate=partial(
                validate_tool_calls, functions=functions, ground_truth=ground_truth, names=names
            ),
            system=TOOLS_SYSTEM,
            task=f"bfcl:{category}",
            tools=tools,
            tool_choice=TOOL_CHOICE,
        )
    listing = "\n".join(json.dumps(f, ensure_ascii=False) for f in functions)
    return Problem(
        id=question["id"],
        prompt=PROMPT.format(functions=listing, request=request),
        validate=partial(validate, functions=functions, ground_truth=ground_truth),
        system=SYSTEM,
        task=f"bfcl:{category}",
    )


# -----------------------------------------------------------------------------
# tools mode: BFCL's function documentation as OpenAI tools

# BFCL's types that JSON schema spells otherwise; "any" means no type constraint (no "type" key).
_JSON_SCHEMA_TYPES: dict[str, str | None] = {
    "dict": "object",
    "float": "number",
    "tuple": "array",
    "any": None,
}
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # what OpenAI accepts as a function name


def tool_name(name: str) -> str:
    """A name OpenAI accepts: other characters become '_' (as the leaderboard's FC mode maps '.'), at
    most 64 characters."""
    return name if _TOOL_NAME.match(name) else (re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:64] or "_")


def json_schema(schema: dict) -> dict:
    """BFCL's parameter schema as JSON schema: types mapped, nested properties and items too; the
    non-standard `optional` flag dropped (optional parameters are those not in `required`)."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, str):
            kind = _JSON_SCHEMA_TYPES.get(value, value)
            if kind is not None:
                out["type"] = kind
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: json_schema(item) for name, item in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = json_schema(value)
        elif key != "optional":
            out[key] = value
    return out


def openai_tools(functions: list[dict]) -> tuple[tuple[dict, ...], dict[str, str]]:
    """The functions as OpenAI tool dicts, and the map from each tool's name back to the function's."""
    tools, names = [], {}
    for function in functions:
        name = tool_name(function["name"])
        base, index = name, 2
        while name in names:  # two functions that map to one name stay apart
            name = f"{base[: 64 - len(str(index)) - 1]}_{index}"
            index += 1
        names[name] = function["name"]
        parameters = json_schema(function.get("parameters") or {"type": "dict", "properties": {}})
        parameters["type"] = "object"
        parameters.setdefault("properties", {})
        tool = {"name": name, "description": function.get("description", ""), "parameters": parameters}
        tools.append({"type": "function", "function": tool})
    return tuple(tools), names


def read_tool_calls(answer: str) -> list[tuple[str, dict]]:
    """The calls of a tools-mode answer: the JSON rendering `[{"name": ..., "arguments": {...}}]` and
    nothing else (text that is not that rendering holds no function call)."""
    try:
        value = json.loads(answer)
    except (json.JSONDecodeError, TypeError):
        value = None
    if (
        not value
        or not isinstance(value, list)
        or not all(isinstance(item, dict) and "name" in item and "arguments" in item for item in value)
    ):
        text = answer.strip() if isinstance(answer, str) else ""
        raise CallParseError(
            "no function call" + (f": the model answered in text: {text[:120]!r}" if text else "")
        )
    return _parse_json_calls(answer)


def validate_tool_calls(
    answer: str, functions: list[dict], ground_truth: list[dict], names: dict[str, str]
) -> Verdict:
    """The tools-mode validator: the tool names mapped back to BFCL's, then the same checker."""
    try:
        calls = read_tool_calls(answer)
    except CallParseError as error:
        return Verdict.fail(str(error))
    return check_calls(
        [(names.get(name, name), arguments) for name, arguments in calls], functions, ground_truth
    )


# -----------------------------------------------------------------------------
# parsing the model's calls


def parse_calls(answer: str) -> list[tuple[str, dict]]:
    """[(function name, {parameter: value})] from JSON or Python call syntax, in a code fence or not."""
    text = answer.strip()
    candidates = [m.group(1) for m in re.finditer(r"```(?:\w+)?\n?(.*?)```", text, re.S)] + [text]
    candidates += [line for line in text.splitlines() if "(" in line or "{" in line]
    errors = []
    for candidate in candidates:
        candidate = candidate.strip()
        if not candidate:
            continue
        for parse in (_parse_json_calls, _parse_python_calls):
            try:
                return parse(candidate)
            except CallParseError as error:
                errors.append(str(error))
    raise CallParseError(errors[-1] if errors else "empty answer")


def _parse_json_calls(text: str) -> list[tuple[str, dict]]:
    start = min((i for i in (text.find("["), text.find("{")) if i >= 0), default=-1)
    if start < 0:
        raise CallParseError("no JSON in the answer")
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as error:
        raise CallParseError(f"invalid JSON: {error}") from error
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict):
            raise CallParseError(f"a call must be a JSON object, got {item!r}")
        if "name" in item:  # {"name": f, "arguments": {...}} (OpenAI style; "parameters" also read)
            arguments = item.get("arguments", item.get("parameters", {}))
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError as error:
                    raise CallParseError(f"arguments of {item['name']} are not JSON") from error
            name = item["name"]
        elif len(item) == 1:  # {"f": {...}} (the leaderboard's decoded form)
            ((name, arguments),) = item.items()
        else:
            raise CallParseError(f"cannot read a call from {item!r}")
        if not isinstance(name, str) or not isinstance(arguments, dict):
            raise CallParseError(f"cannot read a call from {item!r}")
        calls.append((name, arguments))
    if not calls:
        raise CallParseError("no call in the answer")
    return calls


def _parse_python_calls(text: str) -> list[tuple[str, dict]]:
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as error:
        raise CallParseError(f"not Python call syntax: {error.msg}") from error
    nodes = tree.elts if isinstance(tree, ast.List | ast.Tuple) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call):
            raise CallParseError(f"not a function call: {ast.unparse(node)[:60]}")
        if node.args:
            raise CallParseError(f"{ast.unparse(node.func)}: use keyword arguments only")
        arguments = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                raise CallParseError("**kwargs is not allowed")
            try:
                arguments[keyword.arg] = ast.literal_eval(keyword.value)
            except ValueError as error:
                raise CallParseError(f"{keyword.arg}= is not a literal value") from error
        calls.append((_dotted_name(node.func), arguments))
    if not calls:
        raise CallParseError("no call in the answer")
    return calls


def _dotted_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted_name(node.value)}.{node.attr}"
    raise CallParseError(f"not a function name: {ast.unparse(node)}")


# -----------------------------------------------------------------------------
# checking, as the leaderboard's AST checker does


def without_answer_key(reason: str) -> str:
    """A verdict's reason with what only the answer key knows left out (the accepted values, the expected
    function's name): the feedback a retry may be shown, which says which check failed, not the answer."""
    reason = re.sub(r"\s*\(accepted: .*\)$", "", reason)
    return re.sub(r", expected '[^']*'", "", reason)


def validate(answer: str, functions: list[dict], ground_truth: list[dict]) -> Verdict:
    try:
        calls = parse_calls(answer)
    except CallParseError as error:
        return Verdict.fail(f"could not read a function call: {error}")
    return check_calls(calls, functions, ground_truth)


def check_calls(calls: list[tuple[str, dict]], functions: list[dict], ground_truth: list[dict]) -> Verdict:
    """Every expected call matched by exactly one of the model's calls, in any order."""
    if len(calls) != len(ground_truth):
        return Verdict.fail(f"expected {len(ground_truth)} call(s), got {len(calls)}")
    docs = {f["name"]: f for f in functions}
    unmatched = list(range(len(calls)))
    for expected in ground_truth:
        ((name, accepted),) = expected.items()
        reasons = []
        for index in unmatched:
            verdict = check_call(calls[index], docs.get(name, {}), name, accepted)
            if verdict.passed:
                unmatched.remove(index)
                break
            reasons.append(verdict.reason)
        else:
            return Verdict.fail(reasons[0] if len(reasons) == 1 else f"no call matches {name}: {reasons[0]}")
    return Verdict.ok()


def check_call(call: tuple[str, dict], doc: dict, name: str, accepted: dict[str, list]) -> Verdict:
    called, arguments = call
    if called != name:
        return Verdict.fail(f"wrong function {called!r}, expected {name!r}")
    properties = doc.get("parameters", {}).get("properties", {})
    for param in doc.get("parameters", {}).get("required", []):
        if param not in arguments:
            return Verdict.fail(f"{name}: missing required parameter {param!r}")
    for param, value in arguments.items():
        if param not in properties or param not in accepted:
            return Verdict.fail(f"{name}: unexpected parameter {param!r}")
        verdict = _check_value(name, param, value, properties[param], accepted[param])
        if not verdict.passed:
            return verdict
    for param, values in accepted.items():
        if param not in arguments and "" not in values:
            return Verdict.fail(f"{name}: missing parameter {param!r}")
    return Verdict.ok()


def _check_value(name: str, param: str, value: Any, doc: dict, accepted: list) -> Verdict:
    kind = doc.get("type", "any")
    if kind == "float" and type(value) is int:  # Python's int -> float promotion is allowed
        value = float(value)
    # As on the leaderboard, a value of the answer key's own type passes the type check even where the
    # documentation says otherwise (the key sometimes holds a variable name or a string "True").
    key_types = {type(a) for a in accepted if a != ""}
    if not _has_type(value, kind, doc) and type(value) not in key_types:
        return Verdict.fail(f"{name}: {param}={value!r} has the wrong type (expected {kind})")
    if not any(_matches(value, option) for option in accepted if option != ""):
        shown = [a for a in accepted if a != ""]
        return Verdict.fail(f"{name}: {param}={value!r} is not an accepted value (accepted: {shown})")
    return Verdict.ok()


def _matches(value: Any, option: Any) -> bool:
    """One accepted option. A dict option maps each key to its own list of accepted values (as the
    leaderboard's dict checker reads it); a list of such dicts is matched item by item."""
    if isinstance(option, dict) and all(isinstance(v, list) for v in option.values()):
        if not isinstance(value, dict):
            return False
        return all(
            k in option and any(_matches(v, o) for o in option[k] if o != "") for k, v in value.items()
        ) and all(k in value or "" in values for k, values in option.items())
    if isinstance(option, list) and option and all(isinstance(o, dict) for o in option):
        return (
            isinstance(value, list | tuple)
            and len(value) == len(option)
            and all(_matches(v, o) for v, o in zip(value, option, strict=True))
        )
    return _normalize(value) == _normalize(option)


def _has_type(value: Any, kind: str, doc: dict) -> bool:
    expected = _TYPES.get(kind, object)
    if expected is object:
        return True
    # bool is an int in Python; the leaderboard compares exact types, so True is not an integer.
    if type(value) is not expected and not (kind == "tuple" and type(value) is tuple):
        return False
    item_kind = doc.get("items", {}).get("type") if kind in ("array", "tuple") else None
    if item_kind in _TYPES and item_kind not in ("any", "dict", "array"):
        return all(
            _has_type(float(v) if item_kind == "float" and type(v) is int else v, item_kind, {})
            for v in value
        )
    return True


def _normalize(value: Any) -> Any:
    """The leaderboard's lenient comparison: strings lower-cased without spaces and ,./-_*^ ; a float
    equal to an int compares equal; tuples are lists; dicts and lists compare item by item."""
    if isinstance(value, str):
        return re.sub(r"[ ,./\-_*^]", "", value).lower().replace("'", '"')
    if isinstance(value, list | tuple):
        return [_normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items()}
    return value
