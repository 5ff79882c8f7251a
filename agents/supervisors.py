"""Supervisor agents: given an `Observation` of a training run, decide to double, halve or keep the
learning rate, with a short explanation. One small interface for all of them:

    class MySupervisor(Supervisor):
        name = "mine"
        def decide(self, observation: Observation) -> Decision:
            ...
            return Decision("keep", "why")

- `LLMSupervisor`: any chat model from the factory, with a prompt strategy from `selfsteer.prompts`.
- `RuleSupervisor`: the baselines: non-finite, exploded or rising loss -> halve; plateau -> halve
  (a ReduceLROnPlateau equivalent); steady fall -> keep.
- `PlateauSupervisor`: PyTorch's own `ReduceLROnPlateau`, fed the eval loss, decides (halve or keep).
- `HypergradientSupervisor` (agents/hypergradient_supervisor.py): the hypergradient's sign (the mean
  update alignment since the previous evaluation) doubles, halves or keeps.
- `IntervenerSupervisor` (agents/intervener.py): the embedded model with the shipped LoRA adapter,
  trained on counterfactual decision data.
- `ToolSupervisor` (agents/tool_supervisor.py): a chat model with tool calling acts on the run
  itself through the bridge's tools (lr, clipping, checkpoints, evaluation): beyond the three actions.
- `HumanSupervisor`: asks a person (a LangGraph interrupt; see graphs/supervise.py).
- Your own: `module:Class`, or a name registered under the entry-point group `selfsteer.supervisors`;
  `agents/registry.py` builds every one of them by name.

A `decide` that raises is the loop's to handle: the supervision graph retries a model's failed answer
(`ModelAnswerError`) and then journals the supervisor's `fallback` ("keep"); callers outside the graph
(offline collection, scoring) use `decide_or_fall_back`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, create_model

from selfsteer.agents.decision import (
    MAX_EXPLANATION_WORDS,
    LRDecision,
    ModelAnswerError,
    StructuredOutputError,
)
from selfsteer.agents.observation import Observation
from selfsteer.agents.self_correct import Reflection, reflection_prompt
from selfsteer.prompts import PromptStrategy, load_strategy
from selfsteer.trainer_bridge.records import ACTIONS, Action


@dataclass
class Decision:
    """A supervisor's answer; the loop records it, with the lr it led to, as a `records.NewDecision`."""

    action: Action
    explanation: str = ""
    raw_output: str | None = None  # what the model said, verbatim (decision data)
    fallback: bool = False  # True when no valid answer could be had and "keep" was taken
    latency_s: float = 0.0
    # A supervisor that acted on the run itself (through tools) says so, and which lr it set: the
    # loop then sends nothing.
    acted: bool = False
    lr_after: float | None = None
    # A multiple other than the action's own (2 or 0.5), for a supervisor that measured it (probe: x4
    # is a "double" by 4); it must move the lr the action's way.
    factor: float | None = None
    # A measured restart (probe): the in-memory checkpoint of a restart arm the loop loads into a new
    # branch instead of setting the lr (the arm's state, trained from the start at the lr it chose).
    restart: str | None = None

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {self.action!r}")
        if self.factor is not None:
            way = {"double": self.factor > 1, "halve": 0 < self.factor < 1, "keep": self.factor == 1}
            if not way[self.action]:
                raise ValueError(f"factor {self.factor} does not {self.action} the lr")
        if self.restart is not None and (self.action == "keep" or self.factor is None):
            raise ValueError("a restart moves the lr by the factor its arm measured: an action and a factor")

    def apply(self, lr: float) -> float:
        if self.acted and self.lr_after is not None:
            return self.lr_after
        if self.factor is not None:
            return lr * self.factor
        return {"double": lr * 2.0, "halve": lr / 2.0, "keep": lr}[self.action]


class Supervisor:
    """Subclass and implement `decide`. `name`, `strategy` and `model` are stored with each decision."""

    name: str = "supervisor"
    strategy: str | None = None
    model: str | None = None
    uses_chat_model: bool = False  # the caller makes one (--llm, --base-url) only for those that do

    @classmethod
    def from_options(cls, *, chat_model=None, strategy: str | None = None, option: str | None = None):
        """How `agents.registry.make_supervisor` builds every supervisor, built-in or plug-in: the chat
        model the caller made (None unless `uses_chat_model`), the prompt strategy, and what follows the
        colon of its name (`intervener:DIR`). By default: `cls()`."""
        return cls()

    def decide(self, observation: Observation) -> Decision:
        raise NotImplementedError

    def fallback(self, observation: Observation, error: BaseException) -> Decision:
        """The decision when `decide` raised (in the supervision graph: once its retries are spent). By
        default "keep", marked as a fallback, saying why: the run goes on with its settings."""
        why = f"the supervisor failed ({type(error).__name__}: {error}); keeping the current settings"
        return Decision("keep", why[:4000], getattr(error, "raw_output", None), fallback=True)

    def evidence(self, observation: Observation) -> dict | None:
        """The `probe` to run before deciding on `observation` (its args: factors, steps, horizon), whose
        result the loop puts in `observation.probe`; None (the default): decide without one."""
        return None

    def reflect(self, observation: Observation, action: str, facts: str) -> str:
        """Why your decision to `action` failed (self-correction; `facts` says what happened and
        `observation` is what you saw when deciding). The text is shown to your later decisions. By
        default: the facts."""
        return facts


def fall_back(supervisor: Supervisor, observation: Observation, error: Exception) -> Decision:
    """The supervisor's own `fallback` for a failed decision; "keep" when that fails too."""
    try:
        return supervisor.fallback(observation, error)
    except Exception as failure:  # noqa: BLE001 - a plug-in's fallback that fails too
        return Supervisor.fallback(supervisor, observation, failure)


def decide_or_fall_back(supervisor: Supervisor, observation: Observation) -> Decision:
    """One decision outside the supervision graph: `decide`, or `fall_back` when it raises. Asked once:
    the retries are the graph's (its decide node's `RetryPolicy`), and the embedded model retries a
    malformed answer by itself."""
    try:
        return supervisor.decide(observation)
    except Exception as error:  # noqa: BLE001 - any failure of a plug-in ends in its safe action
        return fall_back(supervisor, observation, error)


class ReasonedDecision(BaseModel):
    """Reasoning first, so that the action is chosen with the reasoning in context."""

    reasoning: str = Field(
        default="", max_length=400, description="one or two sentences about the loss trend"
    )
    action: Action = Field(description="what to do with the learning rate")


class LLMSupervisor(Supervisor):
    """A chat model decides, prompted by a named strategy.

    chat_model: any LangChain chat model (see `make_chat_model`).
    strategy: a prompt strategy name (`selfsteer.prompts.list_strategies()`) or a .yaml path.
    One model call per decision: an error of the model or an answer that does not parse raises
    `ModelAnswerError`, which the supervision graph's `decide` node retries (its `RetryPolicy`) before it
    falls back to `fallback` ("keep"). A model that retried by itself and gave up raises
    `StructuredOutputError` (the embedded model's own retries are spent), which is not asked again.
    """

    name = "llm"
    uses_chat_model = True

    @classmethod
    def from_options(cls, *, chat_model=None, strategy: str | None = None, option: str | None = None):
        return cls(chat_model or embedded_chat_model(), option or strategy or "json_history")

    def __init__(self, chat_model, strategy: str | PromptStrategy = "json_history"):
        self.chat_model = chat_model
        self.prompt = strategy if isinstance(strategy, PromptStrategy) else load_strategy(strategy)
        self.strategy = self.prompt.id
        self.model = getattr(chat_model, "model_name", None) or type(chat_model).__name__
        self._schema = ReasonedDecision if self.prompt.schema == "reasoned" else LRDecision
        self._decide = chat_model.with_structured_output(self._schema, include_raw=True)

    def messages(self, observation: Observation) -> list[tuple[str, str]]:
        return [
            ("system", self.prompt.system.strip()),
            ("user", self.prompt.render_user(**observation.prompt_values())),
        ]

    def _decider(self, avoid: list[str]):
        """Structured output whose action cannot be one of `avoid` (rolled back from this state)."""
        allowed = tuple(a for a in ACTIONS if a not in avoid)
        if len(allowed) == len(ACTIONS):
            return self._decide
        action = (Literal[allowed], Field(description="what to do with the learning rate"))
        schema = create_model(self._schema.__name__, __base__=self._schema, action=action)
        return self.chat_model.with_structured_output(schema, include_raw=True)

    def decide(self, observation: Observation) -> Decision:
        started = time.perf_counter()
        try:
            answer = self._decider(observation.avoid).invoke(self.messages(observation))
        except StructuredOutputError:
            raise
        except Exception as failure:
            raise ModelAnswerError(f"{type(failure).__name__}: {failure}") from failure
        raw = answer.get("raw")
        raw_text = raw.content if raw is not None else None
        parsed = answer.get("parsed")
        if parsed is None:
            raise ModelAnswerError(f"malformed answer: {answer.get('parsing_error')}", raw_text)
        explanation = getattr(parsed, "explanation", None) or getattr(parsed, "reasoning", "")
        explanation = " ".join(explanation.split()[:MAX_EXPLANATION_WORDS])
        fell_back = bool(raw is not None and raw.response_metadata.get("fallback"))
        latency = time.perf_counter() - started
        return Decision(parsed.action, explanation, raw_text, fallback=fell_back, latency_s=latency)

    def reflect(self, observation: Observation, action: str, facts: str) -> str:
        """The same chat model's own words (one sentence, bounded); the facts when it fails."""
        try:
            answer = self.chat_model.with_structured_output(Reflection).invoke(
                reflection_prompt(observation, action, facts)
            )
            text = " ".join(answer.reflection.split())
        except Exception:  # a failing model reflects with the facts
            return facts
        return text or facts


class RuleSupervisor(Supervisor):
    """Baselines that read the loss history (eval loss where there is one).

    divergence: halve when the latest loss is this fraction above the previous one.
    explosion: halve when the latest loss is this many times the first train loss measured (the run
        is worse than where it started, even if it is falling back).
    patience: halve when the best loss has not improved by `min_delta` (relative) for this many
        measurements, counted since the last change of learning rate too (ReduceLROnPlateau).
    """

    name = "rule"
    strategy = "rules"

    def __init__(
        self, divergence: float = 0.02, explosion: float = 1.5, patience: int = 3, min_delta: float = 0.005
    ):
        self.divergence = divergence
        self.explosion = explosion
        self.patience = patience
        self.min_delta = min_delta

    def decide(self, observation: Observation) -> Decision:
        if observation.nonfinite:
            return Decision("halve", "the loss is not finite: the learning rate is far too high")
        losses = [value for _, value in observation.losses]
        start = observation.train_loss[0][1] if observation.train_loss else None
        if losses and start and losses[-1] > start * self.explosion:
            return Decision(
                "halve", f"the loss {losses[-1]:.3f} is far above where it started ({start:.3f}): exploded"
            )
        if len(losses) >= 2 and losses[-1] > losses[-2] * (1 + self.divergence):
            return Decision("halve", f"the loss rose from {losses[-2]:.3f} to {losses[-1]:.3f}: diverging")
        since_change = [v for s, v in observation.losses if s > observation.last_lr_change_step()]
        if len(since_change) > self.patience:
            best_before = min(since_change[: -self.patience])
            if min(since_change[-self.patience :]) > best_before * (1 - self.min_delta):
                return Decision(
                    "halve", f"no improvement on {best_before:.3f} in {self.patience} measurements: plateau"
                )
        return Decision("keep", "the loss is falling steadily")


class PlateauSupervisor(Supervisor):
    """PyTorch's own `ReduceLROnPlateau` decides: it is fed each new loss (eval loss where there is one)
    and, when it would reduce its learning rate by `factor` (0.5), the decision is "halve".

    patience: evaluations without a relative improvement of `threshold` before it halves (PyTorch's
        default of 10 never fires in runs with a handful of evaluations).
    """

    name = "plateau"
    strategy = "reduce_lr_on_plateau"

    def __init__(self, patience: int = 1, threshold: float = 0.01):
        import torch

        self.patience, self.threshold = patience, threshold
        self._optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        self._scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self._optimizer, mode="min", factor=0.5, patience=patience, threshold=threshold
        )
        self._seen = -1

    def decide(self, observation: Observation) -> Decision:
        before = self._optimizer.param_groups[0]["lr"]
        for step, value in observation.losses:
            if step > self._seen:
                self._scheduler.step(value)
                self._seen = step
        if self._optimizer.param_groups[0]["lr"] < before:
            return Decision(
                "halve",
                f"ReduceLROnPlateau: no {self.threshold:.0%} improvement on the best loss "
                f"{self._scheduler.best:.4g} for more than {self.patience} evaluation(s)",
            )
        return Decision("keep", f"ReduceLROnPlateau: best loss {self._scheduler.best:.4g}, within patience")


class HumanSupervisor(Supervisor):
    """A person decides. Inside a LangGraph node this pauses the graph with an `interrupt`; the
    answer comes back through `Command(resume={"action": ..., "explanation": ...})` (from the
    terminal or over REST)."""

    name = "human"
    strategy = "human"

    def decide(self, observation: Observation) -> Decision:
        from langgraph.types import interrupt  # lazy: 0.8 s, which every Ray trial would pay

        answer = interrupt(
            {"question": "double, halve or keep the learning rate?", **observation.prompt_values()}
        )
        if isinstance(answer, str):
            answer = {"action": answer}
        return Decision(answer["action"], answer.get("explanation", "human decision"))


def embedded_chat_model():
    from selfsteer.agents.chat_models import make_chat_model

    return make_chat_model("local")
