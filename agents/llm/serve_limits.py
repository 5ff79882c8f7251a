"""The limits of `selfsteer serve-llm`, in a module light to import: the command line's `--help` shows
them without loading torch or FastAPI."""

# The most tokens one answer may ask for, and what an answer without max_tokens gets. 1024 tokens are
# about a minute of one answer on two CPU cores (~20 tokens/s) and ~50 MB of KV cache (46 KB a token);
# SmolLM2-135M repeats itself long before that. `selfsteer serve-llm --max-tokens N` changes it.
DEFAULT_MAX_TOKENS_CAP = 1024
# A JSON answer (response_format) without max_tokens: a decision with a free-text explanation of
# 800 characters is ~200 tokens; the engine's repetition guard closes a looping string long before.
DEFAULT_JSON_MAX_TOKENS = 512
