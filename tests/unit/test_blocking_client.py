"""The blocking HTTP-JSON client (tightwad.llamaserver.blocking) against a real HTTP server on
loopback (http.server in a thread): answers, error statuses, non-JSON, refused connections,
deadlines (silent and trickling servers) and server-sent events."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tightwad.llamaserver import blocking
from tightwad.llamaserver.wire import UpstreamDown, UpstreamError, UpstreamFailure, UpstreamTimeout
from tightwad.pool.procs import free_port

RELEASE = threading.Event()
"""Set when a test ends: handlers that hold a connection open let go."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Retry-After", "3")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/props":
            self._send(200, json.dumps({"total_slots": 2, "build_info": "b1-0c1e570"}).encode())
        elif self.path == "/whoami":
            self._send(200, json.dumps({"auth": self.headers.get("Authorization")}).encode())
        elif self.path == "/text":
            self._send(200, b"<html>not json</html>", "text/html")
        elif self.path == "/string":
            self._send(200, b'"ok"')
        elif self.path == "/missing":  # llama-server's own error shape
            self._send(404, b'{"error":{"message":"File Not Found","type":"not_found_error",'
                            b'"code":404}}')
        elif self.path == "/loading":
            self._send(503, b"Loading model", "text/plain")
        elif self.path == "/silent":
            RELEASE.wait(10)
        elif self.path == "/trickle":  # a byte at a time, each well within a socket timeout
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                if RELEASE.wait(0.05):
                    return
                self.wfile.write(b" ")
                self.wfile.flush()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/echo":
            self._send(200, json.dumps({"got": body,
                                        "type": self.headers["Content-Type"]}).encode())
        elif self.path in ("/stream", "/stream-no-done"):
            # Chunked server-sent events, as aiohttp and llama-server send them.
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            events = [f"data: {json.dumps({'n': i})}\n\n" for i in range(body["n"])]
            events.insert(1, ": a comment line\n\n")
            if self.path == "/stream":
                events.append("data: [DONE]\n\n")
            for event in events:
                raw = event.encode()
                self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/stream-bad":
            self._send(400, b'{"error":{"message":"prompt is too long","code":400}}')


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RELEASE.clear()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        RELEASE.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def test_json_answers_and_headers(server: str) -> None:
    assert blocking.get_json(f"{server}/props") == {"total_slots": 2, "build_info": "b1-0c1e570"}
    assert blocking.get_json(f"{server}/string") == "ok"  # JSON, even if only a string
    assert blocking.get_json(f"{server}/whoami", token="s3cret") == {"auth": "Bearer s3cret"}
    assert blocking.get_json(f"{server}/whoami") == {"auth": None}
    assert blocking.post_json(f"{server}/echo", {"a": [1, "ü"]}) == {
        "got": {"a": [1, "ü"]}, "type": "application/json"}
    answer = blocking.request("POST", f"{server}/echo", {"x": 1}, timeout=5)
    assert answer.status == 200 and answer.is_json and answer.headers["retry-after"] == "3"


def test_error_statuses_carry_the_servers_message(server: str) -> None:
    with pytest.raises(UpstreamError) as err:
        blocking.get_json(f"{server}/missing")
    assert err.value.status == 404 and err.value.message == "File Not Found"
    assert err.value.server == server
    with pytest.raises(UpstreamError) as err:
        blocking.get_json(f"{server}/loading")
    assert err.value.status == 503 and err.value.message == "Loading model"
    # request() and probe() hand any status back instead.
    assert blocking.request("GET", f"{server}/missing", timeout=5).status == 404
    answer = blocking.probe(f"{server}/loading")
    assert (answer.status, answer.body, answer.is_json) == (503, "Loading model", False)
    assert blocking.ok(f"{server}/props") and not blocking.ok(f"{server}/loading")


def test_non_json_answer(server: str) -> None:
    with pytest.raises(UpstreamError, match="non-JSON") as err:
        blocking.get_json(f"{server}/text")
    assert err.value.status == 200 and "<html>" in err.value.message
    answer = blocking.request("GET", f"{server}/text", timeout=5)
    assert answer.body == "<html>not json</html>" and not answer.is_json


def test_nothing_listening() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UpstreamDown) as down:
        blocking.get_json(f"{url}/health")
    assert down.value.server == url and "/health" in down.value.detail
    answer = blocking.probe(f"{url}/health")
    assert answer.status == 0 and "refused" in answer.body.lower()
    assert not blocking.ok(f"{url}/health")
    with pytest.raises(UpstreamFailure, match="not an http"):
        blocking.get_json("127.0.0.1:8090/health")


def test_deadline_bounds_a_silent_and_a_trickling_server(server: str) -> None:
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match="within 0.3 s"):
        blocking.get_json(f"{server}/silent", timeout=0.3)
    assert time.monotonic() - started < 2
    assert blocking.probe(f"{server}/silent", timeout=0.3).status == 0
    # Every byte comes within the deadline; the whole answer does not.
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        blocking.request("GET", f"{server}/trickle", timeout=0.5)
    assert time.monotonic() - started < 2


def test_oversized_answer_is_refused(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blocking, "MAX_BODY", 10)
    with pytest.raises(UpstreamError, match="more than 10 bytes"):
        blocking.get_json(f"{server}/props")


def test_server_sent_events(server: str) -> None:
    got = list(blocking.events(f"{server}/stream", {"n": 3}, timeout=5))
    assert got == [{"n": 0}, {"n": 1}, {"n": 2}]
    # llama-server's own /completion stream ends without [DONE].
    assert len(list(blocking.events(f"{server}/stream-no-done", {"n": 2}, timeout=5))) == 2
    with pytest.raises(UpstreamError) as err:
        next(blocking.events(f"{server}/stream-bad", {}, timeout=5))
    assert err.value.status == 400 and err.value.message == "prompt is too long"
    with pytest.raises(UpstreamDown):
        next(blocking.events(f"http://127.0.0.1:{free_port()}/x", {}, timeout=5))
