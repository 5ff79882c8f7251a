"""The lr-suite harness on a miniature grid of real tiny runs (rules only: no LLM, to stay fast)."""

import json
import math

from selfsteer.evals.lr_suite import SuiteConfig, append_result, cells, load_results, read_result, score
from selfsteer.evals.lr_suite_run import main


def refuse(token):
    raise ValueError(f"not JSON: {token}")


def test_a_miniature_suite_writes_results_report_and_plots(tmp_path):
    config = SuiteConfig(
        recipes=["tiny"],
        lrs={"tiny": {"good": 1e-2, "too_high": 3.0}},
        grid_lrs={"tiny": [5e-2]},
        seeds=[0],
        supervisors=["static", "rule"],
        max_steps={"tiny": 30},
        eval_steps={"tiny": 5},
    )
    assert len(cells(config)) == 5  # 2 starts x 2 supervisors + 1 extra static point
    text = main(config, tmp_path)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert all(json.loads(line, parse_constant=refuse) for line in lines)  # strict JSON: NaN is null
    rows = [read_result(line) for line in lines]
    assert len(rows) == 5
    by = {(r["lr_name"], r["supervisor"]): r for r in score(rows)}
    assert by[("too_high", "static")]["bad_start"]  # lr 3.0 blows the tiny model up
    assert by[("too_high", "rule")]["interventions"] >= 1  # the rules halve it
    assert by[("too_high", "rule")]["final_eval_loss"] < by[("too_high", "static")]["final_eval_loss"]
    assert by[("good", "static")]["interventions"] == 0
    assert "| too_high | rule |" in text and (tmp_path / "report.md").exists()
    assert (tmp_path / "curves_tiny_too_high.png").stat().st_size > 10_000

    # Resumable: a second call runs nothing new.
    main(config, tmp_path)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 5


def test_results_are_strict_json_and_a_nan_loss_reads_back_as_nan(tmp_path):
    """One NaN rule: a run whose loss went NaN is written with null (not a NaN token, which is not JSON),
    and read back as NaN, which the report scores as a bad run; older files' NaN tokens read the same."""
    cell = {"recipe": "tiny", "lr_name": "too_high", "lr": 3.0, "seed": 0}
    static = {**cell, "supervisor": "static", "final_eval_loss": math.nan, "best_eval_loss": math.inf}
    rule = {
        **cell,
        "supervisor": "rule",
        "final_eval_loss": 2.5,
        "best_eval_loss": 2.4,
        "curve": [[5, math.nan]],
    }
    path = tmp_path / "results.jsonl"
    for row in (static, rule):
        append_result(path, row)
    lines = path.read_text().splitlines()
    assert [json.loads(line, parse_constant=refuse)["final_eval_loss"] for line in lines] == [None, 2.5]
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps(row) + "\n" for row in (static, rule)))  # NaN and Infinity tokens
    for rows in (load_results(path), load_results(old)):
        back = {r["supervisor"]: r for r in rows.values()}
        assert math.isnan(back["static"]["final_eval_loss"]) and not math.isfinite(
            back["static"]["best_eval_loss"]
        )
        assert math.isnan(back["rule"]["curve"][0][1])
        scored = {r["supervisor"]: r for r in score(list(rows.values()))}
        assert scored["static"]["bad_start"]  # a NaN run is a bad start, as it was read before
