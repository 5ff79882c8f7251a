"""Agent decision data: every stored decision as a training example for better interveners.

Each row holds what the agent saw (the observation, and the chat messages its strategy rendered from
it), what it answered (raw output, parsed action, explanation), how (strategy, model, latency,
fallback), what followed (the outcome: the loss change over the next window) and, under self-correction,
whether it was rolled back, why (the reflection), and which rolled-back decision a retry replaced."""

from __future__ import annotations

from pathlib import Path

from selfsteer.agents.observation import Observation
from selfsteer.prompts import load_strategy
from selfsteer.trainer_bridge.records import Decision, strict_json


def decision_rows(store, run_id: str | None = None) -> list[dict]:
    """Each decision as its record (`records.Decision`), with the observation and the chat re-rendered."""
    return [
        {
            **Decision.model_validate(d).model_dump(exclude={"id", "created_at", "key"}),
            "observation": d["observation"],
            "messages": _messages(d),
        }
        for d in store.list_decisions(run_id)
    ]


def _messages(decision: dict) -> list[dict] | None:
    """The chat the agent had, re-rendered from the observation with its (versioned) strategy."""
    strategy, observation = decision.get("strategy") or "", decision.get("observation")
    name = strategy.split("@")[0]
    if not observation or not isinstance(observation, dict) or "step" not in observation:
        return None
    try:
        prompt = load_strategy(name)
    except ValueError:  # rules, humans, custom agents: no prompt
        return None
    # The views it was shown, as stored with it; a decision stored before they were re-renders them.
    values = observation.get("views") or Observation.from_record(observation).prompt_values()
    return [
        {"role": "system", "content": prompt.system.strip()},
        {"role": "user", "content": prompt.render_user(**values)},
        {"role": "assistant", "content": decision.get("raw_output") or ""},
    ]


def export_decisions(store, out: str | Path, fmt: str = "jsonl", run_id: str | None = None) -> int:
    """Write the decisions as JSON lines, or as a Hugging Face dataset (`datasets.load_from_disk`);
    returns how many."""
    rows = decision_rows(store, run_id)
    write_rows(rows, out, fmt, json_fields=("observation", "outcome"))
    return len(rows)


def write_rows(rows: list[dict], out: str | Path, fmt: str, json_fields: tuple[str, ...]) -> None:
    """Rows as JSON lines, or as a Hugging Face dataset folder (`datasets.load_from_disk`), where the
    nested, free-form `json_fields` go as JSON text: one schema for every row. The JSON is strict: a
    non-finite number is null (`records.strict_json`)."""
    out = Path(out)
    if fmt == "jsonl":
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            for row in rows:
                f.write(strict_json(row) + "\n")
    elif fmt == "hf":
        from datasets import Dataset

        flat = [{**r, **{k: strict_json(r[k]) for k in json_fields}} for r in rows]
        Dataset.from_list(flat).save_to_disk(str(out))
    else:
        raise ValueError(f"unknown format {fmt!r}: use jsonl or hf")
