"""The supervisor's decision about the learning rate: what it does, and why."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from selfsteer.trainer_bridge.records import Action

MAX_EXPLANATION_WORDS = 100


class StructuredOutputError(RuntimeError):
    """A chat model gave no valid object after every retry of its own, and no fallback was given: a
    caller that retries too would nest its retries in the model's."""


class ModelAnswerError(RuntimeError):
    """A chat model's answer could not be had (an error of the model or its endpoint, or an answer that
    did not parse): worth asking again. The supervision graph's `decide` node retries on it (its
    `RetryPolicy`), then falls back. `raw_output`: what the model said, where it said something."""

    def __init__(self, message: str, raw_output: str | None = None):
        super().__init__(message)
        self.raw_output = raw_output


class LRDecision(BaseModel):
    """Double, halve or keep the learning rate, with a short explanation."""

    action: Action = Field(description="what to do with the learning rate")
    explanation: str = Field(
        default="",
        max_length=800,
        description=f"why, in at most {MAX_EXPLANATION_WORDS} words",
    )

    @field_validator("explanation")
    @classmethod
    def _short(cls, text: str) -> str:
        if len(text.split()) > MAX_EXPLANATION_WORDS:
            raise ValueError(f"the explanation must have at most {MAX_EXPLANATION_WORDS} words")
        return text.strip()


def keep_decision(reason: BaseException | str | None = None) -> LRDecision:
    """The safe action when no valid decision could be had: leave the learning rate alone."""
    detail = f": {reason}" if reason else ""
    return LRDecision(action="keep", explanation=f"fallback (no valid decision{detail})"[:800])
