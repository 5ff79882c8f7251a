"""A racer of tests/test_exactly_once.py: posts one command per key as soon as the start is given. Its
own module, importing only httpx, so that a spawned racer starts in a fraction of a second instead of
importing the test module (and with it torch and transformers)."""

from __future__ import annotations

import httpx


def post_many(url: str, keys: list[str], start, results) -> None:
    start.wait()
    with httpx.Client(base_url=url, timeout=30) as http:
        for key in keys:
            body = {"type": "evaluate", "source": "racer", "idempotency_key": key}
            results.put(http.post("/api/commands", json=body).json()["uuid"])
