"""selfsteer.evals.bench: benchmarks and fuzzers, apart from the product's evaluations.

Each module is a command, `python -m selfsteer.evals.bench.NAME --help`:

- benchmarks: `bridge` (the steering core's overhead), `dashboard`, `cli` (`--help` latency), `llm` and
  `serve_llm` (the embedded model in process and behind `serve-llm`), `reflect`, `grpo`, `rollback`,
  `road` (a supervised tiny run end to end), `pages` (the history pages of a long run), `ray_suite`;
- fuzzers (schemathesis): `fuzz_api` (the control server, with its hooks in `fuzz_hooks`) and
  `fuzz_serve_llm`;
- `listen_race`: each server started many times, a client connecting the moment its URL is printed.
"""
