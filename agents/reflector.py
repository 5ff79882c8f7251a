"""The reflector: a LoRA adapter over the embedded model, trained with GRPO (`selfsteer reflect train
--task decisions:DIR`) to write the reflection after a failed lr decision, so that the retry, decided by
the frozen actor with the reflection in context, lands within the noise margin of the best action. Its
card (data, command, seed, figures) is agents/reflector/README.md.

This module holds what the decisions task (evals/tasks/decisions.py) and a live run's self-correction
share, so that both show the same words:
- the decision point in relative terms (`decision_prompt`) and a failure's outcome (`outcome_reason`);
- the conversation: the decision, the news that it failed, the reflection, "decide again"
  (`conversation`: what graphs/reflect.py builds for the task with strategy reflect_attempt);
- the actor: the untrained embedded model, scoring the actions not barred, contextually calibrated
  (`Actor`);
- `ReflectorSupervisor`: any supervisor, with the reflector writing its reflections and the actor
  making its retries (`selfsteer eval lr-suite --supervisors NAME+rsc`).
"""

from __future__ import annotations

import math
import re
from functools import cache
from pathlib import Path

from selfsteer.agents.observation import Observation
from selfsteer.agents.supervisors import Decision, HumanSupervisor, Supervisor
from selfsteer.prompts import load_prompts
from selfsteer.trainer_bridge.records import ACTIONS

REFLECTOR_DIR = Path(__file__).parent / "reflector"
PROMPTS = "decisions"  # prompts/reflect_decisions.yaml
REFLECTION_TOKENS = 48  # what the shipped reflector was trained to write within
SYSTEM = (
    "You supervise the training of a neural network. After each evaluation you decide whether to double, "
    "halve or keep its learning rate. Answer with one word: double, halve or keep."
)
Message = dict[str, str]


def is_shipped() -> bool:
    return (REFLECTOR_DIR / "adapter_config.json").is_file()


# -----------------------------------------------------------------------------------------------------
# the words


def decision_prompt(observation: Observation) -> str:
    """The decision point in relative terms only: the loss's moves in %, its noise, the lr as multiples
    of its start and of its last change (no absolute lr, which means different things per workload)."""
    values = observation.prompt_values()
    return f"{values['signals']}{values['warnings']}\nDecide: double, halve or keep the learning rate."


def outcome_reason(action: str, before: float | None, after: float | None, steps: int | None) -> str:
    """What the run showed after a failed decision: the eval loss when it was taken and `steps` later."""
    if after is None or not math.isfinite(after):
        return f"after you chose {action}, the loss diverged (NaN) within {steps} steps."
    if before is None:
        return f"after you chose {action}, the eval loss was {after:.3f} {steps} steps later."
    change = 100 * (after - before) / before
    return (
        f"after you chose {action}, the eval loss went from {before:.3f} to {after:.3f} ({change:+.1f}%) "
        f"in {steps} steps, and another action would have done better."
    )


def conversation(prompt: str, action: str, reason: str, reflection: str | None = None) -> list[Message]:
    """The reflector's prompt (no `reflection`) or the actor's retry conversation (with it)."""
    texts = load_prompts(PROMPTS)
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": action},
        {"role": "user", "content": texts["reflect"].format(reason=reason)},
    ]
    if reflection is None:
        return messages
    return [
        *messages,
        {"role": "assistant", "content": reflection},
        {"role": "user", "content": texts["retry_after_reflection"]},
    ]


def reflector_chat(folder: str | Path | None, max_new_tokens: int = REFLECTION_TOKENS):
    """The reflecting model as a batched chat model: a LoRA adapter folder over the embedded model, a
    model folder, or None (the untrained embedded model). Greedy."""
    from selfsteer.agents.llm.chat import LocalChatModel  # lazy: torch (graphs.supervise imports this module)

    chat = LocalChatModel(max_new_tokens=max_new_tokens)
    if folder is not None:
        from selfsteer.agents.llm.engine import LocalEngine
        from selfsteer.agents.llm.weights import load_embedded_model

        folder = Path(folder)
        adapter = (folder / "adapter_config.json").is_file()
        chat._engine = LocalEngine(
            *(load_embedded_model(adapter=folder) if adapter else load_embedded_model(folder))
        )
    return chat


# -----------------------------------------------------------------------------------------------------
# the actor


def content_free(messages: list[Message]) -> list[Message]:
    """The conversation with its content blanked: every user turn and every assistant turn after the first
    (the failed decision stays) replaced by "N/A". The actor's prior over the actions, in this shape."""
    blanked, answered = [], False
    for message in messages:
        if message["role"] == "user" or (message["role"] == "assistant" and answered):
            message = {**message, "content": "N/A"}
        answered = answered or message["role"] == "assistant"
        blanked.append(message)
    return blanked


@cache
def base_engine():
    """The untrained embedded model's engine (one per process), the actor's."""
    from selfsteer.agents.llm.engine import LocalEngine
    from selfsteer.agents.llm.weights import load_embedded_model

    return LocalEngine(*load_embedded_model())


class Actor:
    """The retry's decider: among the actions not barred, the one whose log-probability after the
    conversation rises most above its log-probability after the content-free conversation (contextual
    calibration, Zhao et al. 2021: uncalibrated, the 135M model answers "double" after nearly anything)."""

    def __init__(self, barred: tuple[str, ...] | list[str] = (), engine=None):
        self.allowed = [a for a in ACTIONS if a not in barred]
        if not self.allowed:
            raise ValueError("every action is barred")
        self.engine = engine

    def __call__(self, messages: list[Message]) -> str:
        engine = self.engine or base_engine()
        scores = engine.score_options(engine.chat_prompt_ids(messages), self.allowed)
        prior = engine.score_options(engine.chat_prompt_ids(content_free(messages)), self.allowed)
        lift = [score - base for score, base in zip(scores, prior, strict=True)]
        return self.allowed[max(range(len(self.allowed)), key=lift.__getitem__)]


# -----------------------------------------------------------------------------------------------------
# self-correction of a live run


_FACTS = re.compile(r"At step (\d+) .*?by step (\d+) the eval loss went from (\S+) to (\S+?),")


class ReflectorSupervisor(Supervisor):
    """`base` decides; after one of its decisions failed, the reflector writes the reflection (from the
    decision point and what followed, as the decisions task shows them) and the retry from the same state
    is the actor's, with the reflection in context and the rolled-back actions barred.

    reflector: an adapter folder, a model folder, or "none" (the untrained embedded model)."""

    def __init__(
        self, base: Supervisor, reflector: str | Path = REFLECTOR_DIR, max_new_tokens: int = REFLECTION_TOKENS
    ):
        self.base = base
        self.name = f"{base.name}+reflector"
        self.strategy, self.model = base.strategy, str(reflector)
        self.reflector, self.max_new_tokens = reflector, max_new_tokens
        self._chat = None  # loaded at the first failure: most runs never have one
        self._failed: list[Message] | None = None  # the reflector's conversation, reflection appended

    @property
    def chat(self):
        if self._chat is None:
            folder = None if str(self.reflector) == "none" else self.reflector
            self._chat = reflector_chat(folder, self.max_new_tokens)
        return self._chat

    def evidence(self, observation: Observation) -> dict | None:
        return self.base.evidence(observation)

    def decide(self, observation: Observation) -> Decision:
        if not observation.avoid or self._failed is None:
            return self.base.decide(observation)
        messages = [
            *self._failed,
            {"role": "user", "content": load_prompts(PROMPTS)["retry_after_reflection"]},
        ]
        action = Actor(observation.avoid)(messages)
        return Decision(action, f"retried after the reflection: {messages[-2]['content'][:160]}")

    def fallback(self, observation: Observation, error: BaseException) -> Decision:
        return self.base.fallback(observation, error)

    def reflect(self, observation: Observation, action: str, facts: str) -> str:
        found = _FACTS.search(facts)
        if found is None:  # not the loop's facts: nothing to reflect from
            return facts
        step, judged, before, after = found.groups()
        reason = outcome_reason(action, float(before), float(after), int(judged) - int(step))
        messages = conversation(decision_prompt(observation), action, reason)
        reflection = str(self.chat.invoke(messages).content).strip()
        self._failed = [*messages, {"role": "assistant", "content": reflection}]
        return reflection


def reflecting(supervisor: Supervisor, reflector: str | Path) -> Supervisor:
    """The supervisor that self-correction runs: "self" leaves the reflection on a failed decision and its
    retry to `supervisor` itself (as does a person's supervisor: a person's retries stay theirs);
    "shipped" (agents/reflector/), "none" (the untrained embedded model) or an adapter or model folder
    hands them to a `ReflectorSupervisor` around it."""
    if str(reflector) == "self" or isinstance(supervisor, (HumanSupervisor, ReflectorSupervisor)):
        return supervisor
    return ReflectorSupervisor(supervisor, REFLECTOR_DIR if str(reflector) == "shipped" else reflector)
