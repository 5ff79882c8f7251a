"""Function calling on the bfcl-eval data: loading, splits, held-out live_* categories, parsing JSON
and Python call syntax, and the AST-style checker on hand-written right and wrong calls. No model, no
mocks."""

from __future__ import annotations

import json

import pytest

from selfsteer.evals.tasks import bfcl, get_loader, load_task
from selfsteer.evals.tasks.bfcl import parse_calls, validate

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
    as_json = json.dumps([{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}},
                          {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}])  # fmt: skip
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
                     for call in truth for name, params in call.items()]  # fmt: skip
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
