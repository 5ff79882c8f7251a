"""The records every layer shares: one pydantic model per concept (a run, a metric point, a command, a
decision, an episode ...), used by the store, the control server's responses, the client, the graphs and
the exports. The dashboard's TypeScript types are generated from the server's OpenAPI, which these make.

The lowest layer owns them (trainer_bridge knows nothing of LangGraph), so everyone above may import them."""

from __future__ import annotations

from typing import Literal, get_args

# What a supervisor may do with the learning rate.
Action = Literal["double", "halve", "keep"]
ACTIONS: tuple[str, ...] = get_args(Action)

# A run's life: created, running, then one of the finished phases.
Phase = Literal["created", "running", "finished", "stopped", "failed"]
FINISHED_PHASES: tuple[str, ...] = ("finished", "stopped", "failed")
