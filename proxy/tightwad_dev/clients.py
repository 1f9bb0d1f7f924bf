"""Blocking HTTP clients for reliability, load and fuzz tests of the proxy: a streaming client
that records every event with its time and never hangs past its deadline, a JSON poster (the
shipped blocking client, :mod:`tightwad.llamaserver.blocking`, with the answer's headers), the
RSS of a process, and percentiles."""

from __future__ import annotations

import http.client
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tightwad.llamaserver import blocking


@dataclass
class StreamResult:
    """What a client saw of one streamed request."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    events: list[Any] = field(default_factory=list)
    """Decoded ``data:`` payloads, ``"[DONE]"`` as a string."""
    event_times: list[float] = field(default_factory=list)
    """Seconds from the request to each event."""
    body: Any = None
    """The decoded body of a non-200 answer."""
    transport_error: str | None = None
    """The connection broke (reset, truncated chunked body, deadline): never a clean end."""
    seconds: float = 0.0

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    @property
    def errors(self) -> list[dict]:
        return [e for e in self.events if isinstance(e, dict) and "error" in e]

    @property
    def text(self) -> str:
        parts = []
        for event in self.events:
            if isinstance(event, dict) and event.get("choices"):
                choice = event["choices"][0]
                parts.append(choice.get("text") or (choice.get("delta") or {}).get("content")
                             or "")
        return "".join(parts)

    @property
    def first_text_s(self) -> float | None:
        """Seconds to the first event carrying text (time to first token)."""
        for event, at in zip(self.events, self.event_times):
            if isinstance(event, dict) and event.get("choices"):
                choice = event["choices"][0]
                if choice.get("text") or (choice.get("delta") or {}).get("content"):
                    return at
        return None

    @property
    def clean(self) -> bool:
        """Ended as a client can understand: [DONE] after a finish or one error event, or an
        OpenAI error JSON answer."""
        if self.transport_error is not None:
            return False
        if self.status != 200:
            return isinstance(self.body, dict) and set(self.body) == {"error"}
        return self.done


def _conn(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)


def stream(url: str, path: str, body: dict[str, Any], *, headers: dict[str, str] | None = None,
           timeout: float = 60.0,
           on_event: Callable[[int, Any], None] | None = None) -> StreamResult:
    """POST ``body`` with ``stream: true`` and read the SSE answer to its end. ``timeout``
    bounds each socket wait; ``on_event(index, event)`` runs after each event."""
    result = StreamResult()
    started = time.monotonic()
    conn = _conn(url, timeout)
    try:
        conn.request("POST", path, json.dumps({**body, "stream": True}).encode(),
                     {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        result.status = resp.status
        result.headers = {k.lower(): v for k, v in resp.getheaders()}
        if resp.status != 200:
            raw = resp.read()
            try:
                result.body = json.loads(raw)
            except ValueError:
                result.body = raw
            return result
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            event = "[DONE]" if data == b"[DONE]" else json.loads(data)
            result.events.append(event)
            result.event_times.append(time.monotonic() - started)
            if on_event is not None:
                on_event(len(result.events) - 1, event)
        if not result.done:
            result.transport_error = "the stream ended without [DONE]"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        result.transport_error = f"{exc.__class__.__name__}: {exc}"
    finally:
        conn.close()
        result.seconds = time.monotonic() - started
    return result


def post_json(url: str, path: str, body: Any, *, headers: dict[str, str] | None = None,
              timeout: float = 60.0) -> tuple[int, dict[str, str], Any]:
    """POST JSON; (status, lower-cased headers, decoded body or its text). No answer raises
    :class:`~tightwad.llamaserver.wire.UpstreamDown` or ``UpstreamTimeout``."""
    answer = blocking.request("POST", url + path, body, timeout=timeout, headers=headers)
    return answer.status, dict(answer.headers), answer.body


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
