"""Hostile and malformed input against a real proxy process (issue 8).

The proxy runs as its own process (``python -m tightwad.server``) in front of a real target
(plain llama-server, verify patch on) and drafter, so its resident memory can be read. Thousands
of generated requests (hypothesis): wrong types, huge numbers, deep JSON, invalid UTF-8, random
bytes, absurd max_tokens, empty messages; then transport-level abuse: oversized bodies with and
without a length, chunked bodies, slowloris bodies and headers. Every answer must be a 2xx or an
OpenAI-shaped 4xx (never a 5xx, never a dropped connection for a complete request), memory must
stay bounded, and the proxy must still answer a normal request correctly afterwards.

``TIGHTWAD_FUZZ_EXAMPLES`` scales the number of generated requests (default 1000 JSON bodies,
a third of them valid but for one or two odd fields, plus half as many raw ones; with the fixed
transport and memory batches about 1,900 requests).
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tightwad.pool.procs import HttpService, LlamaServer, ProcessGroup
from tightwad_dev.clients import rss_bytes
from tightwad_dev.inproc import VERIFY_MAX_TOKENS
from tightwad_dev.models import ModelSet
from tightwad_dev.report import measured

pytestmark = pytest.mark.timeout(300)

EXAMPLES = int(os.environ.get("TIGHTWAD_FUZZ_EXAMPLES", "1000"))
MAX_BODY = 64 * 1024
BODY_TIMEOUT_S = 2
CAP = 2  # limits.max_tokens_cap: a valid request generates at most this many tokens
RSS_GROWTH_LIMIT = 64 << 20
START_RSS: list[int] = []  # the proxy's RSS after one warm-up request
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def fuzz_target(bin_dir: Path, models: ModelSet,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HttpService,
                                                                              LlamaServer]]:
    with ProcessGroup(bin_dir=bin_dir, log_dir=tmp_path_factory.mktemp("logs-fuzz")) as group:
        target = group.llama_server(models.target, name="target", slots=2,
                                    args=["--verify-max-tokens", str(VERIFY_MAX_TOKENS)])
        drafter = group.llama_server(models.draft, name="drafter", slots=2)
        proxy = group.tightwad_proxy(target=target, drafter=drafter, slots=2, env={
            "TIGHTWAD_LIMITS__MAX_BODY_BYTES": str(MAX_BODY),
            "TIGHTWAD_LIMITS__MAX_TOKENS_CAP": str(CAP),
            "TIGHTWAD_LIMITS__DEFAULT_MAX_TOKENS": str(CAP),
            "TIGHTWAD_LIMITS__BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        })
        proxy.post("/v1/completions", {"prompt": "warm up", "max_tokens": 2})
        START_RSS.append(rss_bytes(proxy.pid))
        yield proxy, target
        assert "Traceback" not in proxy.log_text(), proxy.log_tail(80)


class Client:
    """One keep-alive connection that reconnects when the server closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None
        self.count = 0
        self.statuses: dict[int, int] = {}

    def send(self, path: str, body: bytes,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            try:
                self.conn.request("POST", path, body,
                                  {"Content-Type": "application/json", **(headers or {})})
                resp = self.conn.getresponse()
                raw = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()  # a keep-alive connection the server had closed: retry once
                if attempt == 2:
                    raise
        self.count += 1
        self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
        return resp.status, raw

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@pytest.fixture(scope="module")
def client(fuzz_target: tuple[HttpService, LlamaServer]) -> Iterator[Client]:
    c = Client(fuzz_target[0].port)
    yield c
    c.close()


def assert_sane(status: int, raw: bytes) -> None:
    """A 2xx, or a 4xx whose body is OpenAI error JSON. Never a 5xx."""
    assert status < 500, (status, raw[:500])
    if status >= 400:
        body = json.loads(raw)
        assert set(body) == {"error"} and body["error"]["message"], raw[:500]
    elif not raw.startswith(b"data: "):
        json.loads(raw)


# -- generated bodies -----------------------------------------------------------------------

leaves = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 80), max_value=2 ** 80)
          | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=12)
edgy_numbers = st.sampled_from([0, -1, 1, 2 ** 31, 2 ** 63, 2 ** 64 + 1, 10 ** 30, -(10 ** 30),
                                1e308, -1e308, 1e-308, 0.5, 3.0, True, False, "4", "", None,
                                [], {}])
values = edgy_numbers | json_values
texts = st.text(max_size=60) | st.sampled_from(["", "\ud800", "\udfff x", "\x00", "<|eot_id|>",
                                                "<|begin_of_text|>" * 3, "😀" * 20])
message = st.fixed_dictionaries(
    {}, optional={"role": st.sampled_from(["system", "user", "assistant", "tool", "developer",
                                           "bogus", "", 5]) | values,
                  "content": texts | st.lists(st.fixed_dictionaries(
                      {"type": st.sampled_from(["text", "image_url", 3]),
                       "text": texts | values}), max_size=3) | values,
                  "name": texts | values})
sampling = dict.fromkeys(("temperature", "top_p", "top_k", "min_p", "seed", "n", "best_of", "logprobs",
                         "top_logprobs", "echo", "suffix", "logit_bias", "tools", "response_format",
                         "model", "ignore_eos"), values)
common = {"max_tokens": values | st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
          "max_completion_tokens": values,
          "stop": texts | st.lists(texts, max_size=20) | values,
          "stream": st.booleans() | values,
          "stream_options": st.fixed_dictionaries({}, optional={"include_usage": values})
          | values,
          **sampling}
chat_bodies = st.fixed_dictionaries({}, optional={
    "messages": st.lists(message, max_size=3) | values, **common})
completion_bodies = st.fixed_dictionaries({}, optional={
    "prompt": texts | st.lists(st.integers(min_value=-5, max_value=300_000), max_size=8)
    | st.lists(texts, max_size=3) | values, **common})
routes = st.sampled_from(["/v1/chat/completions", "/v1/completions"])
# Valid requests but for one or two fields: these get past validation to the pool.
odd_fields = st.dictionaries(st.sampled_from(sorted(common)), values
                             | st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                             max_size=2)
nearly_valid_chat = st.builds(
    lambda msgs, odd: {"messages": msgs, "temperature": 0, **odd},
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                    "content": texts}), min_size=1, max_size=3), odd_fields)
nearly_valid_completion = st.builds(lambda prompt, odd: {"prompt": prompt, **odd},
                                    texts.filter(bool) | st.lists(
                                        st.integers(min_value=0, max_value=128_000),
                                        min_size=1, max_size=8), odd_fields)


@FUZZ
@given(route=routes, data=st.data())
def test_generated_request_bodies(client: Client, route: str, data: st.DataObject) -> None:
    chat = route == "/v1/chat/completions"
    strategy = st.one_of(chat_bodies if chat else completion_bodies,
                         nearly_valid_chat if chat else nearly_valid_completion, values)
    body = data.draw(strategy)
    assert_sane(*client.send(route, json.dumps(body).encode()))


def _deep(n: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * n + close * n).encode()


raw_bodies = (st.binary(max_size=300)
              | st.builds(lambda b: b'{"prompt": "' + b + b'", "max_tokens": 2}',
                          st.binary(max_size=50))
              | st.integers(min_value=1, max_value=200_000).map(_deep)
              | st.integers(min_value=1, max_value=20_000).map(
                  lambda n: b'{"prompt": ' + b"1" * n + b"}")
              | st.sampled_from([b"", b"null", b"NaN", b'{"prompt": NaN}', b'{"max_tokens": 1e999}',
                                 b'{"prompt": "x", "max_tokens": Infinity}', b"\xef\xbb\xbf{}",
                                 b'{"prompt": "\\ud800"}', b'{"messages": [], "max_tokens": 2}',
                                 b'{"messages": [{"role": "user"}]}', b"{" * 3, b'"' * 7]))


@settings(FUZZ, max_examples=max(50, EXAMPLES // 2))
@given(route=routes, raw=raw_bodies)
def test_raw_bodies(client: Client, route: str, raw: bytes) -> None:
    assert_sane(*client.send(route, raw))


# -- transport abuse ------------------------------------------------------------------------


def _raw_exchange(port: int, head: bytes, body_parts: list[bytes], pause: float = 0.0,
                  timeout: float = 30) -> int:
    """Send a hand-made request; the status the server answers (0 if it only closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(head)
            for part in body_parts:
                sock.sendall(part)
                if pause and select.select([sock], [], [], pause)[0]:
                    break  # the server answered: stop sending
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the whole body was sent
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def _head(path: str, extra: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"{extra}\r\n").encode()


def test_oversized_and_chunked_bodies(fuzz_target: tuple[HttpService, LlamaServer]) -> None:
    port = fuzz_target[0].port
    big = b'{"prompt": "' + b"a" * (8 << 20) + b'"}'
    # Announced length above the limit: refused before the body is read.
    assert _raw_exchange(port, _head("/v1/completions", f"Content-Length: {len(big)}\r\n"),
                         [big[:65536]]) == 413
    # No length, chunked, far above the limit.
    chunks = [f"{len(c):x}\r\n".encode() + c + b"\r\n"
              for c in (big[i:i + 65536] for i in range(0, 1 << 20, 65536))]
    assert _raw_exchange(port, _head("/v1/completions", "Transfer-Encoding: chunked\r\n"),
                         chunks + [b"0\r\n\r\n"]) == 413
    # Chunked and small: served.
    ok = json.dumps({"prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()
    parts = [f"{len(ok[i:i + 5]):x}\r\n".encode() + ok[i:i + 5] + b"\r\n"
             for i in range(0, len(ok), 5)]
    assert _raw_exchange(port, _head("/v1/completions", "Transfer-Encoding: chunked\r\n"),
                         parts + [b"0\r\n\r\n"]) == 200


def test_slowloris_bodies_get_408_while_others_are_served(
        fuzz_target: tuple[HttpService, LlamaServer]) -> None:
    proxy = fuzz_target[0]
    port = proxy.port
    body = json.dumps({"prompt": "Hello there", "max_tokens": 2}).encode()
    statuses: list[int] = []

    def slow_body() -> None:
        statuses.append(_raw_exchange(port, _head("/v1/completions",
                                                  f"Content-Length: {len(body)}\r\n"),
                                      [bytes([b]) for b in body], pause=0.25))

    def slow_headers(sock: socket.socket) -> None:
        try:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        except OSError:
            pass

    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(50)]
    try:
        for sock in idle:
            slow_headers(sock)
        threads = [threading.Thread(target=slow_body) for _ in range(10)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        served = proxy.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2,
                                                "temperature": 0}, timeout=30)
        assert served["usage"]["completion_tokens"] == 2
        for t in threads:
            t.join(60)
    finally:
        for sock in idle:
            sock.close()
    assert statuses == [408] * 10, statuses


def test_memory_stays_bounded_and_a_normal_request_still_works(
        fuzz_target: tuple[HttpService, LlamaServer], client: Client) -> None:
    """Runs after the fuzz above (same module): RSS growth since start is bounded, output is
    right."""
    proxy, target = fuzz_target
    before = START_RSS[0]
    # A fixed batch on top: prompts far beyond the context (refused after tokenizing), absurd
    # max_tokens, deep JSON, all close to the body limit.
    huge_prompt = json.dumps({"prompt": "x y " * (MAX_BODY // 4 - 16), "max_tokens": 2}).encode()
    for i in range(150):
        if i % 5 == 0:
            assert_sane(*client.send("/v1/completions", huge_prompt))
        assert_sane(*client.send("/v1/completions", json.dumps(
            {"prompt": "Hi", "max_tokens": 10 ** 9, "temperature": 0}).encode()))
        assert_sane(*client.send("/v1/chat/completions", b"[" * 30000 + b"]" * 30000))
    after = rss_bytes(proxy.pid)
    ids = target.post("/tokenize", {"content": "Once upon a time", "add_special": True})
    ref = target.post("/completion", {"prompt": ids["tokens"], "n_predict": CAP,
                                      "temperature": 0, "cache_prompt": False})
    out = proxy.post("/v1/completions", {"prompt": "Once upon a time", "temperature": 0,
                                         "max_tokens": CAP})
    assert out["choices"][0]["text"] == ref["content"]
    assert after - before < RSS_GROWTH_LIMIT, (before, after)
    measured("fuzz: proxy API", requests=client.count, statuses=client.statuses,
             rss_start_mib=round(before / 2 ** 20, 1), rss_end_mib=round(after / 2 ** 20, 1))


def test_nothing_was_5xx(client: Client) -> None:
    assert client.count >= EXAMPLES
    assert not any(status >= 500 for status in client.statuses), client.statuses
