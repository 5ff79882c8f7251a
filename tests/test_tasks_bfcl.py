"""Function calling on the bfcl-eval data: loading, splits, held-out live_* categories, parsing JSON
and Python call syntax, and the AST-style checker on hand-written right and wrong calls; tools mode (the
functions as OpenAI tools, tool calls rendered as JSON, names mapped back) on the same data. No model,
no mocks."""

from __future__ import annotations

import json
import re

import pytest

from selfsteer.evals.tasks import bfcl, get_loader, load_task, takes_call_mode
from selfsteer.evals.tasks.bfcl import parse_calls, validate
from selfsteer.prompts import load_prompts

WEATHER = {
    "name": "get_weather",
    "description": "Weather of a city.",
    "parameters": {
        "type": "dict",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "unit": {"type": "string"},
            "hourly": {"type": "boolean"},
            "coords": {"type": "array", "items": {"type": "float"}},
        },
        "required": ["city", "days"],
    },
}
ALARM = {
    "name": "alarm.set",
    "parameters": {
        "type": "dict",
        "properties": {"time": {"type": "string"}, "filter": {"type": "dict"}},
        "required": ["time"],
    },
}
FUNCTIONS = [WEATHER, ALARM]
ONE = [
    {
        "get_weather": {
            "city": ["Paris", "Paris, France"],
            "days": [3],
            "unit": ["celsius", ""],
            "hourly": [""],
        }
    }
]
TWO = [
    {"get_weather": {"city": ["Paris"], "days": [3], "unit": [""]}},
    {"get_weather": {"city": ["Rome"], "days": [2], "unit": [""]}},
]


@pytest.mark.parametrize(
    "answer",
    [
        'get_weather(city="Paris", days=3)',
        '[get_weather(city="Paris", days=3, unit="celsius")]',
        'get_weather(city="paris, france", days=3)',  # strings compare like the leaderboard's
        '```python\nget_weather(days=3, city="Paris")\n```',
        '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]',
        '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"days\\": 3}"}',
        '[{"get_weather": {"city": "Paris", "days": 3}}]',
        'Sure! Here it is:\nget_weather(city="Paris", days=3)',
    ],
)
def test_right_single_calls_pass(answer):
    verdict = validate(answer, FUNCTIONS, ONE)
    assert verdict.passed, verdict.reason


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ('get_weather(city="Paris", days=3, color="red")', "unexpected parameter 'color'"),  # extra parameter
        (
            'get_weather(city="Paris", days=3, coords=[1.0])',
            "unexpected parameter 'coords'",
        ),  # not in the key
        ('get_weather(city="Paris", days="3")', "wrong type"),  # wrong type
        ('get_weather(city="Paris", days=3.0)', "wrong type"),
        ('get_weather(city="Paris", days=True)', "wrong type"),  # a bool is not an integer
        ('get_weather(city="Paris")', "missing required parameter 'days'"),
        ('get_weather(city="Berlin", days=3)', "not an accepted value"),
        ('get_weather(city="Paris", days=4)', "not an accepted value"),
        ('get_forecast(city="Paris", days=3)', "wrong function"),
        ('get_weather("Paris", 3)', "keyword arguments"),
        ('get_weather(city="Paris", days=3); get_weather(city="Rome", days=2)', "could not read"),
        ('[get_weather(city="Paris", days=3), get_weather(city="Paris", days=3)]', "expected 1 call"),
        ("I don't know.", "could not read"),
        ('get_weather(city=open("/etc/passwd").read(), days=3)', "not a literal"),  # never evaluated
    ],
)
def test_wrong_single_calls_fail_with_a_reason(answer, reason):
    verdict = validate(answer, FUNCTIONS, ONE)
    assert not verdict.passed
    assert reason in verdict.reason, verdict.reason


def test_optional_parameter_not_marked_optional_must_be_given():
    truth = [{"get_weather": {"city": ["Paris"], "days": [3], "unit": ["celsius"]}}]
    assert not validate('get_weather(city="Paris", days=3)', FUNCTIONS, truth).passed
    assert validate('get_weather(city="Paris", days=3, unit="Celsius")', FUNCTIONS, truth).passed


def test_int_is_accepted_for_float_and_list_items_are_checked():
    truth = [{"get_weather": {"city": ["Paris"], "days": [3], "coords": [[1.0, 2.5]]}}]
    assert validate('get_weather(city="Paris", days=3, coords=[1, 2.5])', FUNCTIONS, truth).passed
    verdict = validate('get_weather(city="Paris", days=3, coords=["1", 2.5])', FUNCTIONS, truth)
    assert not verdict.passed


def test_parallel_calls_match_in_any_order():
    paris, rome = 'get_weather(city="Paris", days=3)', 'get_weather(city="Rome", days=2)'
    assert validate(f"[{paris}, {rome}]", FUNCTIONS, TWO).passed
    assert validate(f"[{rome}, {paris}]", FUNCTIONS, TWO).passed  # reordered
    as_json = json.dumps(
        [
            {"name": "get_weather", "arguments": {"city": "Rome", "days": 2}},
            {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}},
        ]
    )
    assert validate(as_json, FUNCTIONS, TWO).passed
    assert not validate(f"[{paris}]", FUNCTIONS, TWO).passed  # one missing
    wrong = validate(f'[{paris}, get_weather(city="Rome", days=5)]', FUNCTIONS, TWO)
    assert not wrong.passed and "not an accepted value" in wrong.reason
    assert not validate(f"[{paris}, {paris}]", FUNCTIONS, TWO).passed  # one call cannot match twice


def test_dict_parameters_follow_the_answer_keys_per_key_values():
    truth = [{"alarm.set": {"time": ["7:00"], "filter": [{"days": [["mon", "tue"]], "sound": ["bell", ""]}]}}]
    assert validate('alarm.set(time="7:00", filter={"days": ["mon", "tue"]})', FUNCTIONS, truth).passed
    assert validate(
        'alarm.set(time="7:00", filter={"days": ["mon", "tue"], "sound": "Bell"})', FUNCTIONS, truth
    ).passed
    assert not validate('alarm.set(time="7:00", filter={"days": ["mon"]})', FUNCTIONS, truth).passed
    assert not validate(
        'alarm.set(time="7:00", filter={"days": ["mon", "tue"], "x": 1})', FUNCTIONS, truth
    ).passed


def test_dotted_names_parse():
    assert parse_calls("math.factorial(number=5)") == [("math.factorial", {"number": 5})]


def test_data_loads_with_disjoint_splits_and_live_is_held_out():
    for category in bfcl.TRAIN_CATEGORIES:
        train = {p.id for p in load_task(f"bfcl:{category}", "train")}
        test = {p.id for p in load_task(f"bfcl:{category}", "test")}
        assert len(train) > 100 and len(test) > 20 and not train & test
    sample = load_task("bfcl:simple_python", "test", n=5, seed=1)
    assert len(sample) == 5 and [p.id for p in sample] == [
        p.id for p in load_task("bfcl:simple_python", "test", n=5, seed=1)
    ]
    assert "Functions:" in sample[0].prompt and "Request:" in sample[0].prompt
    with pytest.raises(ValueError, match="held out"):
        load_task("bfcl:live_simple", "train")
    assert len(load_task("bfcl:live_simple", "test", n=3)) == 3


def test_ground_truth_answers_pass_the_checker():
    # The first acceptable value of each parameter, written as a JSON call, passes (a few items of the
    # data cannot pass any checker; the leaderboard fails them too): at least 99% of each category.
    for category in bfcl.TRAIN_CATEGORIES:
        records = bfcl._records(category)
        passed = 0
        for question, truth in records:
            calls = [{"name": name, "arguments": {k: _first(v) for k, v in params.items() if _first(v) is not None}}
                     for call in truth for name, params in call.items()]  # the comprehension of _gold_calls # fmt: skip
            passed += validate(json.dumps(calls), question["function"], truth).passed
        assert passed >= 0.99 * len(records), category


def _first(values):
    options = [v for v in values if v != ""]
    if not options:
        return None
    value = options[0]
    if isinstance(value, dict) and all(isinstance(v, list) for v in value.values()):
        return {k: _first(v) for k, v in value.items() if _first(v) is not None}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [_first([v]) for v in value]
    return value


def test_user_tasks_by_module_function():
    loader = get_loader("selfsteer.evals.tasks.countdown:load")
    assert len(loader(split="test", n=2, seed=0)) == 2
    with pytest.raises(ValueError, match="unknown task"):
        get_loader("nope")


# -----------------------------------------------------------------------------
# tools mode: the functions as OpenAI tools (the leaderboard's FC mode)

JSON_SCHEMA_TYPES = {"object", "array", "string", "integer", "number", "boolean", "null"}
NESTED = {
    "name": "geo.route.plan",
    "description": "Plan a route.",
    "parameters": {
        "type": "dict",
        "properties": {
            "start": {"type": "tuple", "items": {"type": "float"}, "description": "(lat, lon)"},
            "payload": {"type": "any"},
            "legs": {
                "type": "array",
                "items": {
                    "type": "dict",
                    "properties": {"speed": {"type": "float"}, "via": {"type": "tuple"}},
                },
            },
            "options": {
                "type": "dict",
                "properties": {"avoid": {"type": "array", "items": {"type": "string"}}},
                "optional": True,
            },
        },
        "required": ["start"],
    },
}


def _types(schema):
    """Every `type` value in a schema, nested ones included."""
    found = [schema["type"]] if "type" in schema else []
    for child in schema.get("properties", {}).values():
        found += _types(child)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            found += _types(schema[key])
    return found


def test_tool_schemas_map_bfcl_types_to_json_schema_and_names_to_openai_names():
    tools, names = bfcl.openai_tools([NESTED, WEATHER])
    route, weather = (tool["function"] for tool in tools)
    assert [tool["type"] for tool in tools] == ["function", "function"]
    assert (route["name"], weather["name"]) == ("geo_route_plan", "get_weather")
    assert names == {"geo_route_plan": "geo.route.plan", "get_weather": "get_weather"}
    params = route["parameters"]
    assert params["type"] == "object" and params["required"] == ["start"]
    props = params["properties"]
    assert props["start"] == {"type": "array", "items": {"type": "number"}, "description": "(lat, lon)"}
    assert props["payload"] == {}  # "any": no type constraint
    assert props["legs"]["items"]["type"] == "object"
    assert props["legs"]["items"]["properties"] == {"speed": {"type": "number"}, "via": {"type": "array"}}
    assert props["options"] == {
        "type": "object",
        "properties": {"avoid": {"type": "array", "items": {"type": "string"}}},
    }
    assert weather["parameters"]["properties"]["coords"] == {"type": "array", "items": {"type": "number"}}
    assert NESTED["parameters"]["type"] == "dict"  # the data is not changed in place
    assert bfcl.tool_name("a" * 70 + ".b") == "a" * 64
    tools, names = bfcl.openai_tools(
        [
            {"name": "a.b", "parameters": {"type": "dict", "properties": {}}},
            {"name": "a_b", "parameters": {"type": "dict", "properties": {}}},
        ]
    )
    assert sorted(names.values()) == ["a.b", "a_b"] and len(names) == 2  # no two tools share a name


def test_every_tool_of_the_data_is_an_openai_tool():
    name = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
    for category in bfcl.CATEGORIES:
        for question, _ in bfcl._records(category):
            tools, names = bfcl.openai_tools(question["function"])
            assert sorted(names.values()) == sorted(f["name"] for f in question["function"])
            for tool in tools:
                function = tool["function"]
                assert name.match(function["name"]), function["name"]
                assert function["parameters"]["type"] == "object"
                assert set(_types(function["parameters"])) <= JSON_SCHEMA_TYPES, (category, question["id"])
                json.dumps(tool)


def _gold_calls(truth, rename=lambda name: name):
    return [{"name": rename(name), "arguments": {k: _first(v) for k, v in params.items() if _first(v) is not None}}
            for call in truth for name, params in call.items()]  # the calls of one question, as JSON # fmt: skip


def test_tools_mode_passes_the_gold_calls_and_agrees_with_text_mode():
    # The gold call, as the loop renders a model's tool calls (tool names, JSON arguments), passes the
    # tools-mode validator exactly where the same call in text mode passes (>= 99% of each category).
    for category in bfcl.TRAIN_CATEGORIES:
        records = bfcl._records(category)
        passed = 0
        for question, truth in records:
            tools_problem = bfcl.make_problem(question, truth, category, call_mode="tools")
            text_problem = bfcl.make_problem(question, truth, category)
            rendered = json.dumps(_gold_calls(truth, bfcl.tool_name))
            verdict = tools_problem.validate(rendered)
            assert verdict == text_problem.validate(json.dumps(_gold_calls(truth))), question["id"]
            passed += verdict.passed
        assert passed >= 0.99 * len(records), category


def test_tools_mode_fails_wrong_calls_and_answers_without_a_call():
    question, truth = next(
        (q, t) for q, t in bfcl._records("simple_python") if "." in q["function"][0]["name"]
    )
    problem = bfcl.make_problem(question, truth, "simple_python", call_mode="tools")
    [gold] = _gold_calls(truth, bfcl.tool_name)
    assert "." not in gold["name"] and problem.validate(json.dumps([gold])).passed
    wrong_value = {**gold, "arguments": {k: "nonsense-value" for k in gold["arguments"]}}
    assert not problem.validate(json.dumps([wrong_value])).passed
    verdict = problem.validate(json.dumps([{**gold, "name": "other_function"}]))
    assert not verdict.passed and "wrong function" in verdict.reason
    verdict = problem.validate(json.dumps([gold, gold]))
    assert not verdict.passed and "expected 1 call" in verdict.reason
    for answer in ("I would call the function.", "", "[]", '{"name": "x"}'):
        verdict = problem.validate(answer)
        assert not verdict.passed and verdict.reason.startswith("no function call"), (answer, verdict)
    assert "answered in text" in problem.validate("I would call the function.").reason
    # a call whose arguments were not JSON (rendered with the raw string) fails with that reason
    verdict = problem.validate(json.dumps([{"name": gold["name"], "arguments": "{'x': 1"}]))
    assert not verdict.passed and "not JSON" in verdict.reason
    # text call syntax is not a tool call
    assert not problem.validate(f"{gold['name']}()").passed


def test_tools_mode_problems_hold_the_request_the_tools_and_require_a_call():
    for category in bfcl.TRAIN_CATEGORIES:
        [text] = load_task(f"bfcl:{category}", "test", n=1, seed=2)
        [tools] = load_task(f"bfcl:{category}", "test", n=1, seed=2, call_mode="tools")
        assert tools.id == text.id and tools.task == text.task == f"bfcl:{category}"
        assert text.prompt.endswith("Request: " + tools.prompt)  # the request alone, no listing
        assert "Functions:" not in tools.prompt and tools.system == bfcl.TOOLS_SYSTEM
        assert tools.tool_choice == "required" and len(tools.tools) >= 1
        assert text.tools == () and text.tool_choice is None
    with pytest.raises(ValueError, match="held out"):
        load_task("bfcl:live_simple", "train", call_mode="tools")
    assert all(p.tools for p in load_task("bfcl:live_multiple", "test", n=3, call_mode="tools"))
    with pytest.raises(ValueError, match="call_mode"):
        load_task("bfcl:simple_python", "test", n=1, call_mode="json")


def test_text_mode_is_the_default_and_unchanged():
    default = load_task("bfcl:multiple", "test", n=4, seed=3)
    text = load_task("bfcl:multiple", "test", n=4, seed=3, call_mode="text")
    assert [(p.id, p.prompt, p.system, p.tools) for p in default] == [
        (p.id, p.prompt, p.system, p.tools) for p in text
    ]
    assert all(p.system == bfcl.SYSTEM and p.prompt.startswith("Functions:\n") for p in text)


def test_call_mode_reaches_only_loaders_that_take_it():
    assert takes_call_mode("bfcl:simple_python") and not takes_call_mode("countdown")
    countdown = load_task("countdown", "test", n=2, seed=0, call_mode="tools")  # ignored
    assert [p.prompt for p in countdown] == [p.prompt for p in load_task("countdown", "test", n=2, seed=0)]
    assert all(not p.tools for p in countdown)
    # a module:function loader written without call_mode still loads when a call mode is given
    assert not takes_call_mode("selfsteer.evals.tasks.countdown:load")
    assert len(load_task("selfsteer.evals.tasks.countdown:load", "test", n=2, call_mode="tools")) == 2


def test_feedback_says_which_check_failed_and_never_the_answer_key():
    """With feedback, a failed verdict names the check that failed (the parameter, the call count) but not
    the accepted values or the expected function; the reflect and plain-retry texts cite it."""
    question, truth = next(
        (q, t) for q, t in bfcl._records("simple_python") if "." in q["function"][0]["name"]
    )
    [gold] = _gold_calls(truth, bfcl.tool_name)
    keyed = bfcl.make_problem(question, truth, "simple_python", call_mode="tools")
    [keyless] = [p for p in load_task("bfcl:simple_python", bfcl.split_of(question["id"]), call_mode="tools", feedback=True) if p.id == keyed.id]  # the same item, loaded as a user does # fmt: skip
    assert keyless.prompts == "feedback" and keyed.prompts is None
    parameter = next(iter(gold["arguments"]))
    value = gold["arguments"][parameter]
    value = value + 997 if isinstance(value, int) else "nonsense-value"  # of the right type, not accepted
    wrong = json.dumps([{**gold, "arguments": {**gold["arguments"], parameter: value}}])
    assert "accepted: [" in keyed.validate(wrong).reason
    reason = keyless.validate(wrong).reason
    assert f"{parameter}={value!r} is not an accepted value" in reason and "accepted:" not in reason
    other = json.dumps([{**gold, "name": "other_function"}])
    assert "expected" in keyed.validate(other).reason
    assert keyless.validate(other).reason == "wrong function 'other_function'"
    assert keyless.validate(json.dumps([gold])).passed
    texts = load_prompts("feedback")
    assert "{reason}" in texts["reflect"] and "{reason}" in texts["plain_retry"]
