"""A coordinator that answers nonsense cannot wedge the proxy (issue 15, points 5 and 9).

The coordinator is a real llama-server behind an HTTP relay that corrupts chosen answers the
way a broken or hostile server could (a real server cannot be made to send them): a streamed
chunk that is not an object, a null where a count belongs, a malformed ``/props``. Every
client must get a clean end: on a stream that already started, an error event and
``data: [DONE]`` (never a second status line inside the body, never a hang); before that, 502
or 503 in OpenAI's error JSON. A malformed ``/props`` at start-up leaves the proxy running and
answering 503 until the coordinator is sane. Error messages name the failing part, never its
address. ``/health`` polled hard costs the coordinator at most one call per
``defaults.HEALTH_CACHE_S``.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web

from tightwad import defaults
from tightwad.pool.procs import LlamaServer, ProcessGroup, free_port
from tightwad_dev.clients import post_json, stream
from tightwad_dev.inproc import ProxyThread, proxy_config
from tightwad_dev.models import ModelSet
from tightwad_dev.report import measured

pytestmark = pytest.mark.timeout(180)

PROMPT = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]

# A fault: (path, the answer's data line or body) -> the replacement, or None to keep it.
Fault = Callable[[str, bytes], bytes | None]


class Tamper:
    """An HTTP relay in front of a real llama-server that replaces chosen answers (whole bodies,
    or single ``data:`` lines of a stream), and counts the calls per path."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.fault: Fault | None = None
        self.calls: collections.Counter[str] = collections.Counter()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Tamper:
        self._thread.start()
        assert self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._relay)
        runner = web.AppRunner(app)

        async def start() -> None:
            self.session = ClientSession()
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()

        self.loop.run_until_complete(start())
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.session.close())
        self.loop.run_until_complete(runner.cleanup())

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.calls[path] += 1
        fault = self.fault
        async with self.session.request(request.method, self.upstream + path_qs(request),
                                        data=await request.read(),
                                        headers={"Content-Type": "application/json"}) as up:
            if not up.headers.get("Content-Type", "").startswith("text/event-stream"):
                body = await up.read()
                changed = fault(path, body) if fault else None
                return web.Response(status=up.status, body=body if changed is None else changed,
                                    content_type="application/json")
            resp = web.StreamResponse(status=up.status,
                                      headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            async for line in up.content:
                changed = fault(path, line.rstrip(b"\n")) if fault else None
                await resp.write(line if changed is None else changed + b"\n")
            await resp.write_eof()
            return resp


def path_qs(request: web.Request) -> str:
    return request.rel_url.path_qs


def nth_chunk(n: int, replacement: bytes, path: str = "/completion") -> Fault:
    """Replace the ``n``-th ``data:`` line of each stream on ``path``."""
    seen: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()

    def fault(at: str, line: bytes) -> bytes | None:
        if at != path or not line.startswith(b"data:"):
            return None
        with lock:
            seen[0] += 1
            return b"data: " + replacement if seen[0] == n else None
    return fault


@pytest.fixture(scope="module")
def server(bin_dir: Path, models: ModelSet,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProcessGroup,
                                                                     LlamaServer]]:
    """A real llama-server with its model's template (tools pass through to it)."""
    with ProcessGroup(bin_dir=bin_dir, log_dir=tmp_path_factory.mktemp("logs-wedge")) as group:
        yield group, group.llama_server(models.draft, name="target", slots=2, args=["--jinja"])


@pytest.fixture
def tamper(server: tuple[ProcessGroup, LlamaServer]) -> Iterator[Tamper]:
    with Tamper(server[1].url) as relay:
        yield relay


@pytest.fixture
def proxy(server: tuple[ProcessGroup, LlamaServer], tamper: Tamper,
          make_proxy: Callable[..., ProxyThread]) -> ProxyThread:
    """A pass-through proxy (mode off: one streamed target /completion) behind the relay."""
    return make_proxy(proxy_config(server[1], None, target={"url": tamper.url, "slots": 2},
                                   speculation={"mode": "off"}))


def _clean_failure(result: Any, code: str) -> dict[str, Any]:
    assert result.transport_error is None, result.transport_error
    assert result.status == 200 and result.done, result.events[-3:]
    error = result.errors[-1]["error"]
    assert result.events[-2] == result.errors[-1], result.events[-3:]  # then [DONE]
    assert error["code"] == code, error
    return error


def _slots_free(proxy: ProxyThread) -> None:
    deadline = time.monotonic() + 10
    while proxy.status()["target"]["slots_in_use"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.status()["target"]["slots_in_use"] == 0


@pytest.mark.parametrize("replacement", [b"5", b"[1, 2]", b"null",
                                         b'{"content": "x", "tokens_predicted": null}',
                                         b'{"content": "x", "tokens": [null]}',
                                         b'{"content": null, "tokens_predicted": 3}',
                                         b'{"error": "plain text"}'])
def test_a_bad_chunk_mid_stream_ends_it_cleanly(proxy: ProxyThread, tamper: Tamper,
                                                replacement: bytes) -> None:
    tamper.fault = nth_chunk(3, replacement)
    result = stream(proxy.url, "/v1/completions", PROMPT, timeout=30)
    code = "upstream_error" if replacement.startswith(b'{"error"') else "bad_upstream_response"
    error = _clean_failure(result, code)
    assert "coordinator" in error["message"]
    assert result.text  # the first chunks arrived before the bad one
    _slots_free(proxy)
    tamper.fault = None
    status, _, answer = post_json(proxy.url, "/v1/completions", PROMPT)
    assert status == 200 and answer["choices"][0]["text"]


@pytest.mark.parametrize("replacement", [b"5", b'{"content": "x", "tokens_predicted": null}'])
def test_a_bad_chunk_without_streaming_is_a_502(proxy: ProxyThread, tamper: Tamper,
                                                replacement: bytes) -> None:
    tamper.fault = nth_chunk(2, replacement)
    status, headers, body = post_json(proxy.url, "/v1/completions", PROMPT)
    assert status == 502, body
    assert set(body) == {"error"} and body["error"]["code"] == "bad_upstream_response"
    _slots_free(proxy)


@pytest.mark.parametrize("replacement", [b"[1, 2]", b'{"choices": [], "usage": '
                                                    b'{"prompt_tokens": "many"}}'])
def test_a_bad_chunk_of_a_passed_through_request(proxy: ProxyThread, tamper: Tamper,
                                                 replacement: bytes) -> None:
    """Tools pass through to the coordinator's own chat endpoint; its chunks go on as they
    are, and a malformed one ends the stream as cleanly."""
    tamper.fault = nth_chunk(2, replacement, "/v1/chat/completions")
    body = {"messages": [{"role": "user", "content": "Hi"}], "tools": TOOLS, "max_tokens": 8}
    result = stream(proxy.url, "/v1/chat/completions", body, timeout=30)
    _clean_failure(result, "bad_upstream_response")
    _slots_free(proxy)


def test_messages_name_the_part_without_its_address(make_proxy: Callable[..., ProxyThread],
                                                    server: tuple[ProcessGroup,
                                                                  LlamaServer]) -> None:
    """A coordinator that is down: 503 naming the coordinator, not where it lives."""
    port = free_port()
    proxy = make_proxy(proxy_config(server[1], None,
                                    target={"url": f"http://127.0.0.1:{port}"},
                                    speculation={"mode": "off"}))
    status, headers, body = post_json(proxy.url, "/v1/completions", PROMPT)
    assert status == 503 and headers.get("retry-after"), body
    message = body["error"]["message"]
    assert "coordinator" in message
    assert str(port) not in message and "127.0.0.1" not in message, message


def test_a_malformed_props_at_start_up_is_503_until_sane(
        server: tuple[ProcessGroup, LlamaServer], tamper: Tamper) -> None:
    """The proxy as its own process: it keeps running and answers 503 with Retry-After while
    /props is malformed, and serves as soon as it is sane."""
    group, target = server
    bad = [b'{"total_slots": "many"}', b'{"default_generation_settings": "x"}',
           b'{"total_slots": 0}']
    tamper.fault = lambda path, body: bad[tamper.calls[path] % len(bad)] \
        if path == "/props" else None
    proxy = group.tightwad_proxy(target=target, mode="off", env={
        "TIGHTWAD_TARGET__URL": tamper.url, "TIGHTWAD_TARGET__SLOTS": "2"})
    try:
        for _ in range(3):
            status, headers, body = post_json(proxy.url, "/v1/completions", PROMPT)
            assert status == 503 and headers.get("retry-after"), body
            assert "coordinator" in body["error"]["message"]
            assert proxy.alive()
        tamper.fault = None
        status, _, body = post_json(proxy.url, "/v1/completions", PROMPT)
        assert status == 200, body
        assert "Traceback" not in proxy.log_text(), proxy.log_tail(40)
    finally:
        proxy.stop()


def test_health_polled_hard_costs_one_coordinator_call_per_period(proxy: ProxyThread,
                                                                  tamper: Tamper) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tightwad.llamaserver import blocking

    before = tamper.calls["/health"]
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: blocking.request("GET", proxy.url + "/health",
                                                           timeout=10).status, range(200)))
    seconds = time.monotonic() - started
    calls = tamper.calls["/health"] - before
    assert answers == [200] * 200
    allowed = seconds / defaults.HEALTH_CACHE_S + 2
    measured("health_polls", polls=200, seconds=seconds, coordinator_calls=calls)
    assert calls <= allowed, (calls, seconds)
