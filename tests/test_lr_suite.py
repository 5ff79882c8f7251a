"""The lr-suite harness on a miniature grid of real tiny runs (rules only: no LLM, to stay fast)."""

import json

from selfsteer.evals.lr_suite import SuiteConfig, cells, score
from selfsteer.evals.lr_suite_run import main


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
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
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
