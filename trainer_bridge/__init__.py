"""selfsteer.trainer_bridge: steer a live Hugging Face Trainer run through a control server.

    from selfsteer.trainer_bridge import make_interactive
    trainer = make_interactive(Trainer)(model=model, args=args, train_dataset=data)
    trainer.train()   # serves http://127.0.0.1:7007 while it trains

Names are imported lazily, so `from selfsteer.trainer_bridge.client import BridgeClient` does not pull in
torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Bridge": "bridge",
    "BridgeConfig": "config",
    "BridgeCallback": "selfsteer.integrations.hf_trainer",
    "StepContext": "loop",
    "attach": "selfsteer.integrations.hf_trainer",
    "make_interactive": "selfsteer.integrations.hf_trainer",
    "CommandRegistry": "commands",
    "CommandError": "commands",
    "Args": "commands",
    "default_registry": "handlers",
    "BridgeClient": "client",
    "AsyncBridgeClient": "client",
    "BridgeHTTPError": "client",
    "SwappableDataset": "data",
    "load_recipe": "recipe",
    "RecipeRun": "runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not module.startswith("selfsteer."):
        module = f"{__name__}.{module}"
    return getattr(importlib.import_module(module), name)
