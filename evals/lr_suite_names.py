"""The lr-suite's default supervisor lists and its rows that are no supervisor, in a module light to import:
`selfsteer eval lr-suite --help` shows them without loading transformers."""

HELD_OUT_SUPERVISORS = ["static", "cosine", "plateau", "rule", "llm:intervener", "intervener"]
DEFAULT_SUPERVISORS = ["static", "cosine", "rule", "llm:json_history", "llm:compact_stats", "llm:reason_then_answer"]  # the suite's default rows, in table order # fmt: skip

# Rows that train without a supervisor: the start lr untouched, a schedule, or an optimizer a user would
# pick instead of a supervisor.
BASELINES = ("static", "cosine", "schedulefree", "prodigy")
# Rows trained as Ray Tune populations (evals/pbt.py); one population answers several cells or one.
POPULATIONS = ("pbt", "pbt-start", "pb2")
# A row's short description, for the CLI's help and the report.
ROWS = {
    "schedulefree": "schedule-free AdamW (the schedulefree package, the Trainer's optim=schedule_free_adamw) at the "
    "start lr, a constant schedule, 10% warmup inside the optimizer, evaluated in the optimizer's eval mode",
    "prodigy": "Prodigy (the prodigyopt package) at its own convention lr=1.0, whatever the start lr: it estimates "
    "the step size itself (so its rows of one workload and seed are one run)",
    "pbt": "Ray Tune's Population Based Training over each workload's start lrs (one population per workload and "
    "seed, each member the same steps as a supervised run)",
    "pbt-start": "PBT built around the cell's start lr only: a population of start x0.25, x1 and x4, each member "
    "the same steps as a supervised run; the row is its best member at the end",
    "pb2": "Ray Tune's PB2 (PBT whose explore is a GP bandit over log10 lr, bounds start /64..x64 clamped to the "
    "lr bounds), the population of pbt-start",
}
