"""The process's engines of the embedded model, one per adapter, each loaded once on first use and
shared by every caller in the process (`get_local_engine`); `forget_local_engine` closes and drops one,
so the next call loads it anew.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from selfsteer.agents.llm.engine import LocalEngine
from selfsteer.agents.llm.weights import ModelNotFoundError, load_embedded_model


def _calibration(adapter: str | None) -> dict[str, dict[str, float]]:
    """The adapter's choice bias (its calibration.json), or none."""
    path = None if adapter is None else Path(adapter) / "calibration.json"
    if path is None or not path.is_file():
        return {}
    bias = json.loads(path.read_text()).get("choice_bias", {})
    if not all(
        isinstance(v, dict) and all(isinstance(x, int | float) for x in v.values()) for v in bias.values()
    ):
        raise ModelNotFoundError(f"{path}: choice_bias must map a field to {{value: number}}")
    return bias


_engines: dict[str | None, LocalEngine] = {}
_engine_lock = threading.Lock()


def _engine_key(adapter: str | Path | None) -> str | None:
    """One engine per adapter folder, however its path is spelled."""
    return None if adapter is None else str(Path(adapter).resolve())


def get_local_engine(adapter: str | Path | None = None) -> LocalEngine:
    """The process-wide engine of the embedded model, or of the model with `adapter` merged in (each
    loaded once, on first use)."""
    key = _engine_key(adapter)
    with _engine_lock:
        if key not in _engines:
            model, tokenizer = load_embedded_model(adapter=key)
            _engines[key] = LocalEngine(model, tokenizer, choice_bias=_calibration(key))
        return _engines[key]


def forget_local_engine(adapter: str | Path | None = None) -> None:
    """Closes and drops the process's engine of `adapter`, if loaded: the next `get_local_engine`
    loads it anew (with its calibration.json as it is then)."""
    key = _engine_key(adapter)
    with _engine_lock:
        engine = _engines.pop(key, None)
    if engine is not None:
        engine.close()
