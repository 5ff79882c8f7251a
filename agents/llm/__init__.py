"""selfsteer.agents.llm: the embedded LLM runtime and what serves it.

- `weights`: SmolLM2-135M-Instruct's weights, found, converted once (GGUF to cached safetensors), loaded.
- `engine`: the `LocalEngine` worker, which decodes every answer in progress together, constrained by
  xgrammar; `batching`: its requests and batch. `local_engines`: the process's engines, loaded once, shared.
- `chat`: `LocalChatModel`, the engine as a LangChain chat model (structured output, tool calls).
- `tool_calls`: tool calling (prompt, grammar, call or answer, calls read back), for `chat` and the server.
- `openai_server`: the OpenAI-compatible HTTP API over the engine (`selfsteer serve-llm`).
- `serve_limits`: that server's token limits, light to import (the command line's `--help` shows them).

Which model a caller gets (this one or an OpenAI endpoint) is decided in `selfsteer.agents.chat_models`.
"""
