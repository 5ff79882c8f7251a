"""The lr-suite's default supervisor lists as plain constants, light to import: `selfsteer eval
lr-suite --help` shows them without loading transformers. The same lists as
`selfsteer.evals.lr_suite` (tests/test_cli_help.py checks that they agree)."""

HELD_OUT_SUPERVISORS = ["static", "cosine", "plateau", "rule", "llm:intervener", "intervener"]
DEFAULT_SUPERVISORS = ["static", "cosine", "rule", "llm:json_history", "llm:compact_stats", "llm:reason_then_answer"]  # fmt: skip
