"""The proxy's HTTP API against real servers: the official `openai` client, SSE, errors, auth,
limits, and what clients see when an upstream fails (tightwad.server.app, tightwad.server.auth,
tightwad.server)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from support import target_alone as target_alone_answer
from support import tokenize
from tightwad.pool.procs import LlamaServer
from tightwad_dev.inproc import PROXY_SLOTS, VERIFY_MAX_TOKENS, ProxyThread, greedy_text_verdict, proxy_config

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."},
                                     {"type": "text", "text": "Just one."}]}]
MULTIBYTE_PROMPTS = ["東京の天気は", "😀 emoji party 🎉", "Привет, как дела?", "日本語と中文 mixed"]


# -- helpers --------------------------------------------------------------------------------


def request(proxy: ProxyThread, method: str, path: str, body: bytes | Iterable[bytes] | None = None,
            headers: dict[str, str] | None = None, chunked: bool = False,
            timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post_json(proxy: ProxyThread, path: str, body: Any, **kw: Any) -> tuple[int, dict, Any]:
    status, headers, raw = request(proxy, "POST", path, json.dumps(body).encode(),
                                   {"Content-Type": "application/json", **kw.pop("headers", {})},
                                   **kw)
    return status, headers, json.loads(raw)


def sse_events(proxy: ProxyThread, path: str, body: Any,
               headers: dict[str, str] | None = None) -> Iterator[Any]:
    """The ``data:`` payloads of a streamed answer, decoded ("[DONE]" stays a string)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    try:
        conn.request("POST", path, json.dumps({**body, "stream": True}).encode(),
                     {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert resp.getheader("Content-Type", "").startswith("text/event-stream")
        for line in resp:
            line = line.strip()
            if line.startswith(b"data: "):
                data = line[6:]
                yield "[DONE]" if data == b"[DONE]" else json.loads(data)
    finally:
        conn.close()


def assert_openai_error(status: int, body: Any, expected: int) -> None:
    assert status == expected, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]


@dataclass
class Reference:
    """The target's own greedy output for a prompt (plain /completion, no speculation)."""

    server: LlamaServer
    prompt: list[int]
    answer: dict

    @property
    def text(self) -> str:
        return self.answer["content"]

    def matches(self, ours: str) -> str:
        """'same' or 'near-tie' (see tightwad_dev.inproc.greedy_text_verdict); fails otherwise."""
        return greedy_text_verdict(self.server, self.prompt, ours, self.answer)


def target_alone(server: LlamaServer, prompt: str | list[int], n: int) -> Reference:
    ids = tokenize(server, prompt) if isinstance(prompt, str) else list(prompt)
    return Reference(server, ids, target_alone_answer(server, ids, n))


def client(proxy: ProxyThread, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=120)


# -- the openai client ----------------------------------------------------------------------


def test_openai_chat_matches_the_target_alone(spec_pool, spec_proxy) -> None:
    coordinator = spec_pool.coordinator
    templated = coordinator.post("/apply-template", {"messages": CHAT})["prompt"]
    ref = target_alone(coordinator, templated, 48)
    ours = client(spec_proxy).chat.completions.create(
        model="anything", messages=CHAT, temperature=0, max_tokens=48)
    assert ours.object == "chat.completion" and ours.id.startswith("chatcmpl-")
    choice = ours.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    ref.matches(choice.message.content)
    assert ours.usage.completion_tokens == 48
    assert ours.usage.prompt_tokens == len(ref.prompt)
    assert ours.usage.total_tokens == ours.usage.prompt_tokens + 48

    chunks = list(client(spec_proxy).chat.completions.create(
        model="anything", messages=CHAT, temperature=0, max_tokens=48, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ref.matches(text)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 48
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_completions_stream_and_not(spec_pool, spec_proxy) -> None:
    ref = target_alone(spec_pool.coordinator, "The quick brown fox", 40)
    api = client(spec_proxy)
    whole = api.completions.create(model="m", prompt="The quick brown fox", temperature=0,
                                   max_tokens=40)
    assert whole.object == "text_completion"
    ref.matches(whole.choices[0].text)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 40
    pieces = list(api.completions.create(model="m", prompt="The quick brown fox",
                                         temperature=0, max_tokens=40, stream=True))
    assert all(p.object == "text_completion" for p in pieces)
    ref.matches("".join(p.choices[0].text for p in pieces))
    assert pieces[-1].choices[0].finish_reason == "length"
    # A token-id prompt gives the same as its text.
    ids = api.completions.create(model="m", prompt=ref.prompt, temperature=0, max_tokens=40)
    ref.matches(ids.choices[0].text)


def test_stop_and_max_completion_tokens_through_the_api(spec_proxy) -> None:
    api = client(spec_proxy)
    full = api.completions.create(model="m", prompt="Once upon a time", temperature=0,
                                  max_tokens=40).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    out = api.completions.create(model="m", prompt="Once upon a time", temperature=0,
                                 max_tokens=40, stop=[stop, "never matches"])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == full[: full.index(stop)]
    status, _, body = post_json(spec_proxy, "/v1/completions", {
        "prompt": "Once upon a time", "temperature": 0, "max_completion_tokens": 5})
    assert status == 200 and body["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("text", MULTIBYTE_PROMPTS)
def test_multibyte_output_is_intact(spec_pool, spec_proxy, text: str) -> None:
    ref = target_alone(spec_pool.coordinator, text, 64)
    status, _, body = post_json(spec_proxy, "/v1/completions",
                                {"prompt": text, "temperature": 0, "max_tokens": 64})
    assert status == 200
    ref.matches(body["choices"][0]["text"])
    streamed = list(sse_events(spec_proxy, "/v1/completions",
                                      {"prompt": text, "temperature": 0, "max_tokens": 64}))
    assert streamed[-1] == "[DONE]"
    pieces = [e["choices"][0]["text"] for e in streamed[:-1]]
    ref.matches("".join(pieces))
    # No delta carries half a character (which would show as U+FFFD).
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in ref.text


def test_models_health_status_and_metrics(spec_proxy) -> None:
    api = client(spec_proxy)
    api.completions.create(model="m", prompt="Hello", temperature=0, max_tokens=16)
    models = api.models.list().data
    assert len(models) == 1 and models[0].id.startswith("tightwad-test-target")
    status, _, health = post_json_get(spec_proxy, "/health")
    assert status == 200 and health["status"] == "ok"
    status, _, info = post_json_get(spec_proxy, "/tightwad/status")
    assert status == 200 and info["mode"] == "remote" and info["speculation_active"]
    assert info["tokenizer_check"]["match"] is True
    assert info["target"]["slots"] == PROXY_SLOTS
    assert info["target"]["verify_limit"] == 16 <= VERIFY_MAX_TOKENS
    stats = info["stats"]
    assert stats["rounds"] > 0 and stats["drafted"] > 0 and stats["tokens"] >= 16
    status, headers, raw = request(spec_proxy, "GET", "/metrics")
    text = raw.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for series in ("tightwad_requests_total", "tightwad_tokens_generated_total",
                   "tightwad_draft_tokens_total", "tightwad_accepted_tokens_total",
                   "tightwad_acceptance_ratio", "tightwad_rounds_total",
                   "tightwad_draft_seconds_bucket", "tightwad_verify_seconds_bucket",
                   "tightwad_speculation_active 1.0"):
        assert series in text, series
    rounds = float(next(line.split()[-1] for line in text.splitlines()
                        if line.startswith("tightwad_rounds_total")))
    assert rounds == stats["rounds"]


def post_json_get(proxy: ProxyThread, path: str, **kw: Any) -> tuple[int, dict, Any]:
    status, headers, raw = request(proxy, "GET", path, **kw)
    return status, headers, json.loads(raw)


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    (b"{not json", 400),
    (b'{"prompt": "\xff\xfe"}', 400),  # invalid UTF-8
    (b"[" * 100_000 + b"]" * 100_000, 400),  # nests too deeply
    (b'{"prompt": NaN}', 400),
    (b"", 400),
    (b"[1, 2]", 400),
    (b'{"prompt": "x", "max_tokens": "many"}', 400),
    (b'{"prompt": "x", "n": 2}', 400),
    (b'{"prompt": "x", "temperature": -1}', 400),
    (b'{"prompt": {"a": 1}}', 400),
    (b'{"prompt": [1, 99999999]}', 400),  # a token id outside the vocabulary
])
def test_bad_input_is_an_openai_4xx(spec_proxy, raw: bytes, expected: int) -> None:
    status, _, body = request(spec_proxy, "POST", "/v1/completions", raw,
                              {"Content-Type": "application/json"})
    assert_openai_error(status, json.loads(body), expected)


def test_oversized_bodies_are_413_also_when_chunked(spec_proxy) -> None:
    limit = spec_proxy.config.limits.max_body_bytes
    big = json.dumps({"prompt": "x" * (limit + 10)}).encode()
    status, _, body = request(spec_proxy, "POST", "/v1/completions", big,
                              {"Content-Type": "application/json"})
    assert_openai_error(status, json.loads(body), 413)
    pieces = (big[i:i + 65536] for i in range(0, len(big), 65536))
    status, _, body = request(spec_proxy, "POST", "/v1/completions", pieces,
                              {"Content-Type": "application/json",
                               "Transfer-Encoding": "chunked"}, chunked=True)
    assert_openai_error(status, json.loads(body), 413)


def test_bad_chat_messages_and_unknown_routes(spec_proxy) -> None:
    status, _, body = post_json(spec_proxy, "/v1/chat/completions", {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert_openai_error(status, body, 400)
    assert body["error"]["param"] == "messages[0].content[0]"
    status, _, body = post_json_get(spec_proxy, "/v2/nothing")
    assert_openai_error(status, body, 404)
    status, _, raw = request(spec_proxy, "GET", "/v1/chat/completions")
    assert_openai_error(status, json.loads(raw), 405)


# -- auth -----------------------------------------------------------------------------------

TOKEN = "s3cret-test-token"


def test_token_is_required_except_for_health(spec_pool, make_proxy, caplog) -> None:
    proxy = make_proxy(proxy_config(spec_pool.coordinator, spec_pool.drafter,
                                    auth={"token": TOKEN}))
    body = {"prompt": "Hi", "max_tokens": 4, "temperature": 0}
    status, headers, answer = post_json(proxy, "/v1/completions", body)
    assert_openai_error(status, answer, 401)
    assert headers["www-authenticate"].startswith("Bearer")
    status, _, answer = post_json(proxy, "/v1/completions", body,
                                  headers={"Authorization": "Bearer wrong"})
    assert_openai_error(status, answer, 401)
    for path in ("/v1/models", "/tightwad/status", "/metrics"):
        assert request(proxy, "GET", path)[0] == 401, path
    assert request(proxy, "GET", "/health")[0] == 200
    with pytest.raises(openai.AuthenticationError):
        client(proxy, "wrong").models.list()
    out = client(proxy, TOKEN).completions.create(model="m", prompt="Hi", max_tokens=4,
                                                  temperature=0)
    assert out.usage.completion_tokens == 4
    assert TOKEN not in caplog.text


def test_server_refuses_a_public_address_without_a_token(tmp_path) -> None:
    env = {**os.environ, "TIGHTWAD_LISTEN__HOST": "0.0.0.0"}
    env.pop("TIGHTWAD_AUTH__TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "tightwad.server"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "auth.token" in done.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("speculation:\n  k_max: 0\n")
    done = subprocess.run([sys.executable, "-m", "tightwad.server", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "speculation.k_max" in done.stderr


# -- failing upstreams ----------------------------------------------------------------------


def test_drafter_killed_mid_stream_is_invisible_and_drafting_resumes(spec_pool, procs, models,
                                                                     make_proxy) -> None:
    drafter = procs.llama_server(models.draft, name="doomed-drafter", slots=PROXY_SLOTS)
    proxy = make_proxy(proxy_config(spec_pool.coordinator, drafter))
    prompt = "Once upon a time, in a land far away,"
    ref = target_alone(spec_pool.coordinator, prompt, 128)

    text = []
    for events, event in enumerate(sse_events(proxy, "/v1/completions",
                                              {"prompt": prompt, "temperature": 0,
                                               "max_tokens": 128}), 1):
        if event == "[DONE]":
            break
        assert "error" not in event, event
        text.append(event["choices"][0]["text"])
        if events == 3:
            drafter.kill()
    ref.matches("".join(text))
    status = proxy.status()
    assert status["stats"]["fallbacks"] > 0 and status["drafter"]["available"] is False
    metrics = request(proxy, "GET", "/metrics")[2].decode()
    down = next(line for line in metrics.splitlines()
                if line.startswith('tightwad_drafter_fallbacks_total{reason="down"}'))
    assert float(down.split()[-1]) == status["stats"]["fallbacks"]

    procs.llama_server(models.draft, name="revived-drafter", slots=PROXY_SLOTS,
                       port=drafter.port)
    proxy.engine.servers.drafter_gate.retry_at = 0.0  # skip the rest of the backoff
    drafted = status["stats"]["drafted"]
    out = client(proxy).completions.create(model="m", prompt=prompt, temperature=0,
                                           max_tokens=128)
    ref.matches(out.choices[0].text)
    after = proxy.status()
    assert after["stats"]["drafted"] > drafted and after["drafter"]["available"] is True


def test_target_killed_gives_an_error_event_then_503s(spec_pool, procs, models,
                                                      make_proxy) -> None:
    target = procs.llama_server(models.target, name="doomed-target", slots=PROXY_SLOTS,
                                args=["--verify-max-tokens", str(VERIFY_MAX_TOKENS)])
    proxy = make_proxy(proxy_config(target, spec_pool.drafter))
    started = time.monotonic()
    events = []
    for event in sse_events(proxy, "/v1/completions", {
            "prompt": "Once upon a time", "temperature": 0, "max_tokens": 400,
            "ignore_eos": True}):
        events.append(event)
        if len(events) == 3:
            target.kill()
    assert time.monotonic() - started < 60, "the stream hung"
    assert events[-1] == "[DONE]"
    error = events[-2]
    assert set(error) == {"error"} and error["error"]["code"] == "upstream_unavailable"

    status, headers, body = post_json(proxy, "/v1/completions", {"prompt": "x", "max_tokens": 4})
    assert_openai_error(status, body, 503)
    assert int(headers["retry-after"]) > 0
    status, headers, body = post_json(proxy, "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 4, "stream": True})
    assert_openai_error(status, body, 503)
    status, _, body = post_json_get(proxy, "/health")
    assert_openai_error(status, body, 503)
    with pytest.raises(openai.APIStatusError) as err:
        client(proxy).chat.completions.create(model="m", messages=CHAT, max_tokens=4)
    assert err.value.status_code == 503


def test_client_disconnect_cancels_the_upstream_work(spec_pool, spec_proxy) -> None:
    slots = spec_proxy.engine.servers.target_slots
    long_request = {"prompt": "Once upon a time", "temperature": 0, "max_tokens": 2000,
                    "ignore_eos": True}

    def wait_idle(timeout: float) -> float:
        t0 = time.monotonic()
        while slots.in_use and time.monotonic() - t0 < timeout:
            time.sleep(0.02)
        return time.monotonic() - t0

    # Non-streamed: the client gives up after a second (a full answer takes far longer).
    conn = http.client.HTTPConnection("127.0.0.1", spec_proxy.port, timeout=1)
    conn.request("POST", "/v1/completions", json.dumps(long_request).encode(),
                 {"Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        conn.getresponse()
    assert slots.in_use == 1
    conn.close()
    assert wait_idle(5) < 5, "the proxy kept generating for a client that left"

    # Streamed: read a few chunks, then hang up.
    conn = http.client.HTTPConnection("127.0.0.1", spec_proxy.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({**long_request, "stream": True}).encode(),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    for _ in range(4):
        resp.readline()
    conn.close()
    assert wait_idle(5) < 5, "the proxy kept streaming to a client that left"
    # A verify already on the coordinator runs to its end, and a target-only stream is closed:
    # idle within seconds, not after the 2000 tokens asked for.
    t0 = time.monotonic()
    while busy := [s for s in spec_pool.coordinator.get("/slots") if s.get("is_processing")]:
        assert time.monotonic() - t0 < 3, f"the coordinator is still generating for a " \
                                          f"cancelled request: {busy}"
        time.sleep(0.05)
