"""selfsteer.agents.llm: the embedded LLM runtime and what serves it.

- `engine`: SmolLM2-135M-Instruct on the CPU, loaded once (GGUF converted and cached) and shared; the
  `LocalEngine` worker decodes every answer in progress together, constrained by xgrammar.
- `chat`: `LocalChatModel`, the engine as a LangChain chat model (structured output, tool calls).
- `openai_server`: the OpenAI-compatible HTTP API over the engine (`selfsteer serve-llm`).
- `serve_limits`: that server's token limits, light to import (the command line's `--help` shows them).

Which model a caller gets (this one or an OpenAI endpoint) is decided in `selfsteer.agents.chat_models`.
"""
