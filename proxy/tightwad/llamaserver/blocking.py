"""The blocking HTTP-JSON client: what runs without an event loop (the CLI, discovery, doctor,
the process supervisor) calls llama-servers and the proxy through it. Standard library only.

Every call opens one connection and has one deadline that bounds connecting, sending and the
whole answer, so a server that trickles bytes cannot hold a caller past it. Failures are the
:mod:`tightwad.llamaserver.wire` types the async client raises too, named after the server's
origin (``http://host:port``): :class:`UpstreamDown` (nothing listens, or the connection broke),
:class:`UpstreamTimeout` (the deadline passed), :class:`UpstreamError` (an HTTP error status
with the server's own message, or an answer that is not JSON where JSON was asked for), and
:class:`UpstreamFailure` itself for a URL that is not ``http(s)://host[:port]/...``.
Built on http.client rather than urllib: no proxy from the environment, no redirects.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tightwad.llamaserver.wire import (
    UpstreamDown,
    UpstreamError,
    UpstreamFailure,
    UpstreamTimeout,
    error_message,
)

MAX_BODY = 8 << 20
"""Bytes of an answer read at most: a stranger found by a network scan cannot fill memory."""


@dataclass(frozen=True)
class Answer:
    """An HTTP answer, whatever its status."""

    status: int
    """0 from :func:`probe` when nothing answered (``body`` then says why)."""
    body: Any
    """The decoded JSON, or the text when the body is not JSON."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Names lower-cased."""
    is_json: bool = False


def _where(url: str) -> tuple[str, str]:
    """``http://h:1/a?b`` -> (``http://h:1``, ``/a?b``): the server that failures name, and the
    path they mention."""
    parts = urlsplit(url)
    return (f"{parts.scheme}://{parts.netloc}",
            (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))


class _Call:
    """One request on a fresh connection, under one deadline."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamFailure(url, "not an http:// or https:// URL")
        self.server, self.path = _where(url)
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        try:
            port = parts.port
        except ValueError:
            raise UpstreamFailure(url, "the port is not a number") from None
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.conn = cls(parts.hostname, port, timeout=timeout)
        self.sock: socket.socket | None = None

    def arm(self) -> None:
        """Give the next socket operation what is left of the deadline."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        if self.sock is not None:
            self.sock.settimeout(left)

    def send(self, method: str, body: Any, token: str | None,
             headers: Mapping[str, str] | None) -> http.client.HTTPResponse:
        sent = {"Accept": "application/json", **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        if token:
            sent["Authorization"] = f"Bearer {token}"
        self.conn.connect()
        # The connection drops its socket when the answer closes it; reading still uses it.
        self.sock = self.conn.sock
        self.arm()
        self.conn.request(method, self.path, data, sent)
        self.arm()
        return self.conn.getresponse()

    def read(self, resp: http.client.HTTPResponse) -> bytes:
        buf = bytearray()
        while True:
            self.arm()
            chunk = resp.read1(1 << 16)
            if not chunk:
                return bytes(buf)
            buf += chunk
            if len(buf) > MAX_BODY:
                raise UpstreamError(self.server, resp.status,
                                    f"{self.path} answered more than {MAX_BODY} bytes")

    def failure(self, exc: BaseException) -> UpstreamFailure:
        """The wire failure for what the socket or http.client raised."""
        if isinstance(exc, TimeoutError):
            return UpstreamTimeout(self.server, f"no answer to {self.path} within "
                                                f"{self.timeout:g} s")
        return UpstreamDown(self.server, f"{self.path}: {exc.__class__.__name__}: {exc}")

    def close(self) -> None:
        self.conn.close()


def _answer(resp: http.client.HTTPResponse, raw: bytes) -> Answer:
    headers = {k.lower(): v for k, v in resp.getheaders()}
    text = raw.decode("utf-8", "replace")
    try:
        return Answer(resp.status, json.loads(text), headers, is_json=True)
    except ValueError:
        return Answer(resp.status, text, headers)


def request(method: str, url: str, body: Any = None, *, timeout: float,
            token: str | None = None, headers: Mapping[str, str] | None = None) -> Answer:
    """Send ``body`` (as JSON, when given) and return the answer, whatever its status.

    Raises :class:`UpstreamDown` or :class:`UpstreamTimeout` when no whole answer came."""
    call = _Call(url, timeout)
    try:
        resp = call.send(method, body, token, headers)
        return _answer(resp, call.read(resp))
    except (OSError, http.client.HTTPException) as exc:
        raise call.failure(exc) from None
    finally:
        call.close()


def _json(url: str, answer: Answer) -> Any:
    """The JSON of a 200 answer; :class:`UpstreamError` for any other."""
    server, path = _where(url)
    if answer.status != 200:
        text = json.dumps(answer.body) if answer.is_json else answer.body
        raise UpstreamError(server, answer.status, error_message(answer.status, text))
    if not answer.is_json:
        raise UpstreamError(server, 200, f"{path} answered with non-JSON: "
                                         f"{answer.body[:200]!r}")
    return answer.body


def get_json(url: str, *, timeout: float = 3.0, token: str | None = None) -> Any:
    """GET ``url``: its JSON (status 200), else an :class:`UpstreamFailure`."""
    return _json(url, request("GET", url, timeout=timeout, token=token))


def post_json(url: str, body: Any, *, timeout: float = 60.0, token: str | None = None) -> Any:
    """POST ``body`` as JSON: the answer's JSON (status 200), else an :class:`UpstreamFailure`."""
    return _json(url, request("POST", url, body, timeout=timeout, token=token))


def probe(url: str, *, timeout: float = 2.0, token: str | None = None) -> Answer:
    """GET ``url`` and never raise: status 0, with the reason as the body, when nothing
    (usable) answered. For scans and health checks, where "nothing there" is an answer."""
    try:
        return request("GET", url, timeout=timeout, token=token)
    except UpstreamFailure as exc:
        return Answer(0, exc.detail)


def ok(url: str, *, timeout: float = 2.0, token: str | None = None) -> bool:
    """Does ``url`` answer a GET with 200 (``/health``: up and loaded)?"""
    return probe(url, timeout=timeout, token=token).status == 200


def events(url: str, body: Any, *, timeout: float, token: str | None = None) -> Iterator[Any]:
    """POST ``body`` and yield each ``data:`` payload of the server-sent events, decoded, until
    ``[DONE]`` or the end of the stream; ``timeout`` bounds the whole stream. A non-200 answer
    raises :class:`UpstreamError` with the server's message, as does an event that is not
    JSON."""
    call = _Call(url, timeout)
    try:
        resp = call.send("POST", body, token, {"Accept": "text/event-stream"})
        if resp.status != 200:
            text = call.read(resp).decode("utf-8", "replace")
            raise UpstreamError(call.server, resp.status, error_message(resp.status, text))
        while True:
            call.arm()
            line = resp.readline(MAX_BODY)
            if not line:
                return  # the stream ended (without [DONE]: llama-server's own /completion)
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            try:
                event = json.loads(data)
            except ValueError:
                raise UpstreamError(call.server, 200, f"{call.path} sent a non-JSON event: "
                                                      f"{data[:200]!r}") from None
            yield event
    except (OSError, http.client.HTTPException) as exc:
        raise call.failure(exc) from None
    finally:
        call.close()
