"""The limits of `selfsteer serve-llm` as plain constants, light to import: the command line's
`--help` shows them without loading torch or FastAPI. The same values as
`selfsteer.agents.openai_server` (tests/test_cli_help.py checks that they agree)."""

# The most tokens one answer may ask for, and what an answer without max_tokens gets.
DEFAULT_MAX_TOKENS_CAP = 1024
# A JSON answer (response_format) without max_tokens.
DEFAULT_JSON_MAX_TOKENS = 512
