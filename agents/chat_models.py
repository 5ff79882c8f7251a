"""One factory for every chat model selfsteer uses, and one place that turns their failures into a
message a person can act on.

    make_chat_model("local")                     # the embedded SmolLM2-135M-Instruct, in this process
    make_chat_model("openai:gpt-4o-mini")        # OpenAI, key from OPENAI_API_KEY
    make_chat_model("openai:smollm2", base_url="http://127.0.0.1:8008/v1")   # any compatible server
"""

from __future__ import annotations

import json
import os
from typing import Any

from langchain_core.language_models import BaseChatModel

from selfsteer.trainer_bridge.client import CommandTimeout
from selfsteer.trainer_bridge.net import is_loopback_url

DEFAULT_TIMEOUT_S = 60.0
BASE_URL_ENV = ("SELFSTEER_BASE_URL", "OPENAI_BASE_URL")
API_KEY_ENV = ("SELFSTEER_API_KEY", "OPENAI_API_KEY")


class ChatModelConfigError(ValueError):
    """The model spec or its settings cannot work; the message says what to change."""


def make_chat_model(
    spec: str = "local",
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    temperature: float = 0.0,
    seed: int | None = 0,
    max_retries: int = 2,
    **kwargs: Any,
) -> BaseChatModel:
    """A LangChain chat model from a spec: `local` or `openai:MODEL`.

    base_url / api_key: for `openai:`; default to $SELFSTEER_BASE_URL or $OPENAI_BASE_URL, and
        $SELFSTEER_API_KEY or $OPENAI_API_KEY. A server on this machine (loopback) needs no key.
    timeout: seconds per request (no call hangs without one).
    max_retries: retries of a failed request (OpenAI) or of a malformed structured answer (local).
    Other keyword arguments go to the model's constructor.
    """
    kind, _, model_name = spec.partition(":")
    if kind == "local" and not model_name:
        from selfsteer.agents.llm.chat import LocalChatModel  # lazy: torch, for the embedded model only

        return LocalChatModel(
            temperature=temperature, seed=seed, max_retries=max_retries, timeout=timeout, **kwargs
        )
    if kind == "openai" and model_name:
        from langchain_openai import ChatOpenAI  # lazy: openai's client, for openai: models only

        base_url = base_url or _first_env(BASE_URL_ENV)
        api_key = api_key or _first_env(API_KEY_ENV)
        if not api_key:
            if base_url is None or not is_loopback_url(base_url):
                raise ChatModelConfigError(
                    f"no API key for {spec}: set OPENAI_API_KEY (or SELFSTEER_API_KEY), or pass --api-key"
                    + ("" if base_url else "; for a local server pass --base-url http://127.0.0.1:PORT/v1")
                )
            api_key = "not-needed"  # local OpenAI-compatible servers ignore the key, the client wants one
        return ChatOpenAI(
            model=model_name,
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            temperature=temperature,
            seed=seed,
            **kwargs,
        )
    raise ChatModelConfigError(
        f"unknown model {spec!r}: use 'local' or 'openai:MODEL' (e.g. openai:gpt-4o-mini)"
    )


def describe_llm_error(error: BaseException, spec: str = "", base_url: str | None = None) -> str:
    """One line that says what went wrong with a chat model and what to do about it."""
    import openai  # lazy: some 0.6 s, paid only when an error is described

    where = base_url or "the OpenAI API"
    if isinstance(error, ChatModelConfigError):
        return str(error)
    if isinstance(error, openai.APITimeoutError):
        return f"{where} did not answer in time: check that the server is up and not overloaded, or raise --timeout"
    if isinstance(error, CommandTimeout):  # the training run's delay, not the model's
        return f"the training run did not apply a command in time ({error}): is it held by another client or busy?"
    if isinstance(error, TimeoutError):  # the embedded model's own deadline
        return f"the model did not answer in time{f' ({error})' if str(error) else ''}: raise --timeout"
    if isinstance(error, openai.APIConnectionError):
        return f"cannot reach {where}: is the server running and the --base-url right? ({error})"
    if isinstance(error, openai.AuthenticationError):
        return f"{where} rejected the API key: check OPENAI_API_KEY / --api-key"
    if isinstance(error, openai.NotFoundError):
        return f"{where} does not know the model in {spec!r} or the path: check the model name and that --base-url ends in /v1"
    if isinstance(error, openai.APIStatusError):
        return f"{where} answered HTTP {error.status_code}: {error.message}"
    from selfsteer.agents.llm.weights import ModelNotFoundError  # lazy: torch

    if isinstance(error, ModelNotFoundError):
        return str(error)
    malformed = _malformed_response(error)
    if malformed:
        return (
            f"{where} sent a malformed response ({malformed}): is it really an OpenAI-compatible "
            "endpoint, and does --base-url end in /v1?"
        )
    return f"{type(error).__name__}: {error}"


def _malformed_response(error: BaseException) -> str | None:
    """What was wrong with an answer that arrived but is no chat completion, or None if the error is
    something else. The client libraries raise plain ValueError / TypeError / KeyError for these, so
    they are told apart by their messages (langchain-openai's and the json module's)."""
    text = str(error)
    if isinstance(error, json.JSONDecodeError):
        return "the body is not JSON"
    if isinstance(error, ValueError) and "Unexpected response type" in text:
        _, _, preview = text.partition("got str: ")  # langchain-openai quotes the body's start
        return f"the body is not JSON: {preview[:80]}" if preview else "the body is not JSON"
    if isinstance(error, TypeError | KeyError) and "'choices'" in text:
        return "JSON without 'choices'"
    if isinstance(error, ValueError) and "No generation chunks were returned" in text:
        return "a stream without any completion chunk"
    if isinstance(error, ValueError | TypeError | KeyError) and "json" in text.lower():
        return text
    return None


def _first_env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)
