"""Paged reads of what grows with a run, shared by the live control server and the history app
(`server.py`): a page of metrics (whole steps), of decisions, of the command journal, each full page with
a `Link: <...>; rel="next"` header (`NEXT_PAGE` documents it), and the query parameters they take."""

from typing import Annotated, Any, Literal

from fastapi import Query, Request, Response
from pydantic import Field, WithJsonSchema

from selfsteer.trainer_bridge.records import COMMAND_STATUSES, MAX_INT
from selfsteer.trainer_bridge.store import Store

METRICS_PAGE = 10_000  # rows (about 1.5 MB of JSON): the default and the most a page of metrics holds
LIST_PAGE = 1_000  # commands or decisions a page holds at most (and by default)

NEXT_PAGE = {
    200: {
        "headers": {
            "Link": {
                "description": 'On a full page: `<URL of the next page>; rel="next"`. No Link: the last page.',
                "schema": {"type": "string"},
            }
        }
    }
}


def _next_page(request: Request, response: Response, **cursor: Any) -> None:
    url = request.url.include_query_params(**cursor)
    response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'


Limit = Annotated[
    int, Query(ge=1, le=LIST_PAGE, description=f"At most this many rows (at most {LIST_PAGE}).")
]


def metrics_page(
    store: Store,
    run_id: str,
    request: Request,
    response: Response,
    since: int | None,
    branch: str | None,
    names: list[str] | None,
    limit: int,
    points: int | None,
) -> list[dict]:
    """One page of a run's metrics: whole steps, at most `limit` rows (one step with more comes whole)."""
    rows = store.get_metrics(run_id, since, names, branch, limit=limit + 1, points=points)
    if len(rows) > limit:
        cut = rows[limit]["step"]  # the first step this page cannot hold whole
        rows = [row for row in rows[:limit] if row["step"] < cut]
        if not rows:
            rows = store.get_metrics(run_id, cut - 1, names, branch, until_step=cut, points=points)
        _next_page(request, response, since=rows[-1]["step"])
    return rows


Since = Annotated[
    int | None,
    Query(ge=-1, le=MAX_INT, description="Only steps after this one (a page's last step: the next page)."),
]
BranchName = Annotated[str | None, Query(max_length=200)]
MetricNames = Annotated[
    list[Annotated[str, Field(max_length=200)]] | None,
    Query(max_length=100, description="Only these metrics (repeat the parameter).", alias="name"),
    # `?name=loss` is one name and a list of one alike: the schema says both (schemathesis sends a string).
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "array", "items": {"type": "string", "maxLength": 200}, "maxItems": 100},
                {"type": "string", "maxLength": 200},
                {"type": "null"},
            ]
        }
    ),
]
MetricsLimit = Annotated[
    int, Query(ge=1, le=METRICS_PAGE, description=f"At most this many rows (at most {METRICS_PAGE}).")
]
Points = Annotated[
    int | None,
    Query(
        ge=1,
        le=10_000,
        description="Down-sample for a chart: the steps cut into this many equal ranges, each keeping per "
        "series its lowest and highest value and its first NaN, and each series its latest row.",
    ),
]
AfterId = Annotated[int, Query(ge=0, le=MAX_INT, description="Only decisions with a larger id.")]
After = Annotated[str | None, Query(max_length=200, description="Only commands journaled after this uuid.")]
Status = Annotated[Literal[COMMAND_STATUSES] | None, Query()]  # type: ignore[valid-type]


def decisions_page(
    store: Store, run_id: str, request: Request, response: Response, after_id: int, limit: int
):
    rows = store.list_decisions(run_id, after_id=after_id, limit=limit)
    if len(rows) == limit:
        _next_page(request, response, after_id=rows[-1]["id"])
    return rows


def commands_page(
    store: Store,
    run_id: str,
    request: Request,
    response: Response,
    status: str | None,
    after: str | None,
    limit,
):
    rows = store.list_commands(run_id, status, after=after, limit=limit)
    if len(rows) == limit:
        _next_page(request, response, after=rows[-1]["uuid"])
    return rows
