"""schemathesis hooks for `selfsteer.evals.bench.fuzz_api` (loaded through SCHEMATHESIS_HOOKS): what the fuzzer
sends to one live run, beyond what the OpenAPI says.

- No `stop`: it ends the run, and the rest of the fuzz would only meet a finished one (409). Its refusals
  and its effect are tested in tests/test_bridge_api.py and tests/test_exactly_once.py.
- An idempotency key names one command: a key the fuzzer happens to reuse for a different body is refused
  (422, as the Idempotency-Key draft says), which no JSON Schema can express. Each key gets a digest of
  the rest of its body, so a repeat of the same body under the same key is still a repeat.
- With SELFSTEER_FUZZ_LOG set, one JSON line per response ({"status", "method", "path"}) and per failed
  check ({"failure": class, "code", "operation"}) goes to that file: what the figures are counted from.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any

import schemathesis

KEY_MAX = 200  # CommandBody.idempotency_key's max_length
LOG = os.environ.get("SELFSTEER_FUZZ_LOG")
_lock = threading.Lock()


def _log(record: dict) -> None:
    if LOG:
        with _lock, open(LOG, "a") as file:
            file.write(json.dumps(record) + "\n")


@schemathesis.hook
def filter_case(context: schemathesis.HookContext, case: schemathesis.Case) -> bool:
    body: Any = case.body
    return not (isinstance(body, dict) and body.get("type") == "stop")


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    body: Any = case.body
    key = body.get("idempotency_key") if isinstance(body, dict) else None
    if isinstance(key, str) and 1 <= len(key) <= KEY_MAX:  # a key that breaks the schema stays as it is
        rest = {name: value for name, value in body.items() if name != "idempotency_key"}
        digest = hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:16]
        body["idempotency_key"] = f"{key[: KEY_MAX - 17]}/{digest}"
    return case


@schemathesis.hook
def after_call(
    context: schemathesis.HookContext, case: schemathesis.Case, response: schemathesis.Response
) -> None:
    _log({"status": response.status_code, "method": case.method, "path": case.path})


@schemathesis.hook
def filter_failure(context: schemathesis.HookContext, failure: Any, case: Any, response: Any) -> bool:
    sent = {"query": case.query, "body": case.body, "path": case.path_parameters}
    _log(
        {
            "failure": type(failure).__name__,
            "code": failure.code,
            "operation": failure.operation,
            "title": failure.title,
            "status": getattr(response, "status_code", None),
            "sent": json.dumps(sent, default=repr)[:1000],
        }
    )
    return True  # counted, and kept: schemathesis reports it too
