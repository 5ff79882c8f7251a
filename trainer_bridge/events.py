"""`EventHub`: the fan-out of a live run's events (metric points in batches, commands, state changes,
warnings) from the training thread to the WebSocket subscribers of `/api/events` (`server.py`), without
the training thread ever waiting on a client."""

import asyncio
import contextlib
import json
import threading

EVENT_QUEUE_SIZE = 1000  # events a subscriber's queue holds; a slow one loses its oldest


class EventHub:
    """Fan-out from the training thread to WebSocket subscribers on the server's loop.

    Metrics come every step; sending each as its own frame to every subscriber would cost the training
    process (and the subscribers) CPU per step. So metric points are batched: one
    `{"event": "metrics", "points": [...]}` frame per `interval_s` at most. Other events go out at once,
    after any metrics still waiting, so subscribers see everything in order."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.subscribers: set[asyncio.Queue] = set()
        self._points: list[dict] = []
        self._lock = threading.Lock()  # guards _points and _flush_scheduled across the two threads
        self._flush_scheduled = False

    def publish_point(self, point: dict) -> None:
        """A metrics point {step, branch, values}; sent with others within interval_s."""
        loop = self.loop
        if loop is None or not self.subscribers:
            return
        with self._lock:
            self._points.append(point)
            schedule, self._flush_scheduled = not self._flush_scheduled, True
        if schedule:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody to tell
                loop.call_soon_threadsafe(loop.call_later, self.interval_s, self._flush)

    def publish(self, event: dict) -> None:
        loop = self.loop
        if loop is None or not self.subscribers:
            return
        text = json.dumps(event, default=str)  # encoded once, here, for every subscriber
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._send_after_points, text)

    def _send_after_points(self, text: str) -> None:
        self._flush()
        self._fan_out(text)

    def _flush(self) -> None:
        with self._lock:
            points, self._points, self._flush_scheduled = self._points, [], False
        if points:
            self._fan_out(json.dumps({"event": "metrics", "points": points}, default=str))

    def _fan_out(self, text: str) -> None:
        for queue in list(self.subscribers):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()  # a slow client loses its oldest event, never blocks anyone
            queue.put_nowait(text)
