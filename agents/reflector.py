"""The reflector: a LoRA adapter over the embedded model, trained with GRPO (`selfsteer reflect train
--task decisions:DIR`) to write the reflection after a failed lr decision, so that the retry, decided by
the frozen model with the reflection in context, lands within the noise margin of the best action.
Its card (data, command, seed, figures) is agents/reflector/README.md."""

from __future__ import annotations

from pathlib import Path

REFLECTOR_DIR = Path(__file__).parent / "reflector"


def is_shipped() -> bool:
    return (REFLECTOR_DIR / "adapter_config.json").is_file()
