"""Blocking HTTP for the benchmark: a streamed generation timed as the client sees it (both
llama-server's /completion and the OpenAI shapes), JSON requests and Prometheus sums."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tightwad_dev import clients


@dataclass
class Stream:
    """One streamed generation as the client saw it."""

    started: float
    first: float | None = None  # first chunk carrying output
    ended: float = 0.0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)  # last JSON object with stats
    n_tokens: int = 0  # token ids seen so far (llama-server streams only), read live

    @property
    def elapsed(self) -> float:
        return self.ended - self.started

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.started


def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def stream_post(url: str, path: str, body: dict[str, Any], timeout: float = 600,
                on_first: Callable[[Stream], None] | None = None) -> Stream:
    """POST with ``stream: true`` and read the SSE answer (llama-server or OpenAI shapes).
    Unlike :func:`tightwad_dev.clients.stream` this needs no ``[DONE]`` (llama-server's
    /completion stream ends without one) and times the first chunk carrying output;
    ``on_first`` is called then with the stream being read, so its counters can be read live
    (the steady-state window of a batch starts when every stream has called it)."""
    conn = _connection(url, timeout)
    out = Stream(started=time.perf_counter())
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status} from {url}{path}: {resp.read()[:500]!r}")
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            obj = json.loads(payload)
            if "error" in obj:
                raise RuntimeError(f"error event from {url}{path}: {obj['error']}")
            if "choices" in obj:  # OpenAI text_completion chunk
                piece = "".join(c.get("text") or "" for c in obj["choices"])
                if obj.get("usage"):
                    out.final = obj
            else:  # llama-server /completion chunk
                piece = obj.get("content") or ""
                out.token_ids += obj.get("tokens") or []
                out.n_tokens = len(out.token_ids)
                if obj.get("stop"):
                    out.final = obj
            if out.first is None and (piece or obj.get("tokens")):
                out.first = time.perf_counter()
                if on_first is not None:
                    on_first(out)
            out.text += piece
        out.ended = time.perf_counter()
    finally:
        conn.close()
    return out


def _get(url: str, path: str, timeout: float) -> bytes:
    conn = _connection(url, timeout)
    try:
        conn.request("GET", path, None, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status} from {url}{path}: {data[:300]!r}")
        return data
    finally:
        conn.close()


def get_json(url: str, path: str, timeout: float = 30) -> Any:
    return json.loads(_get(url, path, timeout))


def post_json(url: str, path: str, body: Any, timeout: float = 300) -> Any:
    status, _, payload = clients.post_json(url, path, body, timeout=timeout)
    if status != 200:
        raise RuntimeError(f"HTTP {status} from {url}{path}: {str(payload)[:300]}")
    return payload


def prometheus_sums(url: str, names: Sequence[str]) -> dict[str, float]:
    """Unlabelled samples of a /metrics page (Prometheus text format: the proxy's, or
    llama-server's with ``--metrics``)."""
    text = _get(url, "/metrics", 30).decode()
    found = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in found:
            found[name] = float(value)
    return found
