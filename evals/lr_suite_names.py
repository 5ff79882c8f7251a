"""The lr-suite's default supervisor lists, in a module light to import: `selfsteer eval lr-suite --help`
shows them without loading transformers."""

HELD_OUT_SUPERVISORS = ["static", "cosine", "plateau", "rule", "llm:intervener", "intervener"]
DEFAULT_SUPERVISORS = ["static", "cosine", "rule", "llm:json_history", "llm:compact_stats", "llm:reason_then_answer"]  # fmt: skip
