"""selfsteer: LLMs that supervise training runs and correct themselves.

    import selfsteer
    steer = selfsteer.attach(model, optimizer, max_steps=1000)   # a plain PyTorch loop, steered
    for step in steer.steps(): ...

The project's folders are installed under this name: `selfsteer.trainer_bridge` (the steering core and
its control server), `selfsteer.integrations` (its adapters: the HF Trainer, a plain loop, Lightning,
accelerate), `selfsteer.tools`, `selfsteer.agents`, `selfsteer.graphs`, `selfsteer.evals`,
`selfsteer.cli`. This file only names the entry points; they are imported when first used, so
`import selfsteer` costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "attach": "selfsteer.integrations.plain",  # a plain PyTorch or accelerate loop
    "Steer": "selfsteer.integrations.plain",
    "make_interactive": "selfsteer.integrations.hf_trainer",  # the Hugging Face Trainer
    "attach_trainer": "selfsteer.integrations.hf_trainer",
    "BridgeConfig": "selfsteer.trainer_bridge.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'selfsteer' has no attribute {name!r}")
    target = "attach" if name == "attach_trainer" else name
    return getattr(importlib.import_module(module), target)
