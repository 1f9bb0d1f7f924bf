"""Real clients through the proxy against real llama-servers: the official `openai` client
(tool calls, `.parse()` with a pydantic schema, logprobs, embeddings, models.retrieve),
LangChain's `ChatOpenAI` (`bind_tools`, `with_structured_output`), LiteLLM with a base URL
without `/v1`, a browser's CORS preflight, a queued stream's keep-alive comments, the clamp
header, `reasoning_content` and the `developer` role.

The test models have random weights, so what they write is noise. Output that must have a
shape gets it from llama.cpp's grammars: a json_schema answer is constrained to the schema.
A tool call is constrained only after its opening tag (llama.cpp's grammar for tool_choice
"required" lets text come first, and a random model never writes the tag), so the tool tests
open the assistant's message with the tag (``continue_final_message``, a llama.cpp field the
proxy passes on), offer arguments from an enum, ask for one call (``parallel_tool_calls``
false) and stop at the closing tag: the model then writes a complete call, which llama-server
parses into ``tool_calls``.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel

from tightwad.pool.procs import LlamaServer, ProcessGroup
from tightwad.server.app import CLAMP_HEADER
from tightwad_dev.inproc import VERIFY_MAX_TOKENS, ProxyThread, proxy_config
from tightwad_dev.models import ModelSet

TOKEN = "clients-test-token-7f3a9c21d4e8"
ALLOWED = "http://allowed.example"
SLOTS = 2
CITIES = ["Paris", "Rome", "Oslo"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": CITIES}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = {"role": "user", "content": "What is the weather in Paris?"}
OPEN_CALL = {"role": "assistant", "content": "<tool_call>\n"}
# Continue the assistant's opened call, stop at its end (see the module docstring).
CALL_EXTRA = {"continue_final_message": True, "add_generation_prompt": False}


class Weather(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    sunny: bool


@pytest.fixture(scope="module")
def servers(bin_dir: Path, models: ModelSet, source_tree: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LlamaServer]]:
    """Coordinators (no RPC: the API is what is tested) with a tool-calling template (serving
    embeddings too) and with a thinking one (not serving them), verify-capable, and a drafter
    with the same tokenizer."""
    templates = source_tree / "models" / "templates"
    group = ProcessGroup(bin_dir=bin_dir, log_dir=tmp_path_factory.mktemp("logs-clients"))
    with group:
        coordinator_args = ["--verify-max-tokens", str(VERIFY_MAX_TOKENS), "--jinja"]
        yield {
            "tools": group.llama_server(models.target, name="coordinator-tools", slots=SLOTS,
                                        args=[*coordinator_args, "--embeddings", "--pooling",
                                              "mean", "--chat-template-file",
                                              str(templates / "Qwen-Qwen2.5-7B-Instruct.jinja")]),
            "thinking": group.llama_server(
                models.target, name="coordinator-thinking", slots=SLOTS,
                args=[*coordinator_args, "--chat-template-file", str(
                    templates / "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja")]),
            "drafter": group.llama_server(models.draft, name="drafter", slots=2 * SLOTS),
        }


@pytest.fixture(scope="module")
def proxy(servers: dict[str, LlamaServer]) -> Iterator[ProxyThread]:
    """Token, CORS for one origin, keep-alive comments every 0.2 s."""
    thread = ProxyThread(proxy_config(
        servers["tools"], servers["drafter"], auth={"token": TOKEN},
        target={"slots": SLOTS}, drafter={"slots": SLOTS},
        listen={"cors_origins": [ALLOWED], "sse_keepalive_s": 0.2})).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def thinking_proxy(servers: dict[str, LlamaServer]) -> Iterator[ProxyThread]:
    thread = ProxyThread(proxy_config(servers["thinking"], servers["drafter"],
                                      target={"slots": SLOTS}, drafter={"slots": SLOTS})).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def client(proxy: ProxyThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def raw(proxy: ProxyThread, method: str, path: str, body: Any = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=120)
    try:
        conn.request(method, path, None if body is None else json.dumps(body).encode(),
                     {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


# -- the official openai client -------------------------------------------------------------


def test_openai_tool_call_round_trip(client: openai.OpenAI, model: str,
                                     proxy: ProxyThread) -> None:
    first = client.chat.completions.create(
        model=model, messages=[ASK, OPEN_CALL], tools=[WEATHER], tool_choice="required",
        stop=["</tool_call>"], temperature=0, max_tokens=200, extra_body=CALL_EXTRA,
        parallel_tool_calls=False)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments)["city"] in CITIES
    assert first.model == model  # the proxy's name, not the coordinator's path

    # The answer to the call goes back in the history, as a client's agent loop sends it.
    second = client.chat.completions.create(
        model=model, tools=[WEATHER], temperature=0, max_tokens=8, messages=[
            ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}])
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    passed = proxy.status()["passed_through"]
    assert {"tools", "tool_calls", "role tool", "tool_call_id"} <= set(passed), passed


def test_openai_streamed_tool_call_and_named_tool_choice(client: openai.OpenAI,
                                                         model: str) -> None:
    other = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC"]}}}}}
    stream = client.chat.completions.create(
        model=model, messages=[ASK, OPEN_CALL], tools=[other, WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stop=["</tool_call>"], temperature=0, max_tokens=200, extra_body=CALL_EXTRA,
        parallel_tool_calls=False, stream=True)
    name, arguments, finish, ids = "", "", None, set()
    for part in stream:
        ids.add(part.id)
        for choice in part.choices:
            for call in choice.delta.tool_calls or ():
                name += call.function.name or "" if call.function else ""
                arguments += call.function.arguments or "" if call.function else ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and name == "get_weather", (finish, name)
    assert json.loads(arguments)["city"] in CITIES
    assert len(ids) == 1  # one id for the whole stream, the role chunk's too


def test_openai_parse_with_a_pydantic_schema(client: openai.OpenAI, model: str) -> None:
    done = client.chat.completions.parse(
        model=model, messages=[ASK], response_format=Weather, temperature=0, max_tokens=200)
    parsed = done.choices[0].message.parsed
    assert isinstance(parsed, Weather) and parsed.city in CITIES


def test_openai_logprobs_come_from_the_coordinator(client: openai.OpenAI, model: str,
                                                   servers: dict[str, LlamaServer]) -> None:
    ours = client.chat.completions.create(model=model, messages=[ASK], temperature=0,
                                          max_tokens=6, logprobs=True, top_logprobs=3)
    entries = ours.choices[0].logprobs.content
    assert len(entries) == ours.usage.completion_tokens == 6
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)
    theirs = servers["tools"].post("/v1/chat/completions", {
        "messages": [ASK], "temperature": 0, "max_tokens": 6, "logprobs": True,
        "top_logprobs": 3})
    assert ours.choices[0].message.content == theirs["choices"][0]["message"]["content"]


def test_openai_embeddings_where_the_coordinator_serves_them(
        client: openai.OpenAI, model: str, thinking_proxy: ProxyThread,
        servers: dict[str, LlamaServer]) -> None:
    done = client.embeddings.create(model=model, input=["hello", "world"])
    assert [len(e.embedding) for e in done.data] == [128, 128] and done.model == model
    theirs = servers["tools"].post("/v1/embeddings", {"input": ["hello", "world"]})
    assert done.data[1].embedding == theirs["data"][1]["embedding"]
    # A coordinator started without --embeddings: a clear 501 naming the flag.
    other = openai.OpenAI(base_url=thinking_proxy.url, api_key="none", max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        other.embeddings.create(model=model, input="hello")
    assert err.value.status_code == 501
    assert "--embeddings" in err.value.message and "embeddings_not_served" in str(err.value.body)


def test_openai_models_retrieve_and_context_length(client: openai.OpenAI, model: str,
                                                   proxy: ProxyThread) -> None:
    card = client.models.retrieve(model)
    assert card.id == model
    listed = client.models.list().data[0].model_dump()
    assert listed["context_length"] == proxy.status()["target"]["n_ctx"]
    assert listed["meta"]["n_vocab"] > 0 and listed["meta"]["n_ctx_train"] > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("some-other-model")


# -- LangChain and LiteLLM ------------------------------------------------------------------


def test_langchain_bind_tools_and_structured_output(proxy: ProxyThread, model: str) -> None:
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_openai import ChatOpenAI

    def get_weather(city: Literal["Paris", "Rome", "Oslo"]) -> str:
        """The weather in a city."""
        return "sunny"

    llm = ChatOpenAI(base_url=proxy.url + "/v1", api_key=TOKEN, model=model, temperature=0,
                     max_tokens=200, max_retries=0)
    called = llm.bind_tools([get_weather], tool_choice="required",
                            parallel_tool_calls=False).invoke(
        [HumanMessage(ASK["content"]), AIMessage(OPEN_CALL["content"])],
        stop=["</tool_call>"], extra_body=CALL_EXTRA)
    [call] = called.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in CITIES

    structured = llm.with_structured_output(Weather).invoke(ASK["content"])
    assert isinstance(structured, Weather) and structured.city in CITIES


def test_litellm_with_a_base_url_without_v1(proxy: ProxyThread, model: str,
                                            client: openai.OpenAI) -> None:
    import litellm

    messages = [{"role": "user", "content": "Say something."}]
    answer = litellm.completion(model=f"openai/{model}", api_base=proxy.url, api_key=TOKEN,
                                messages=messages, temperature=0, max_tokens=8)
    ours = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                          max_tokens=8)
    assert answer.choices[0].message.content == ours.choices[0].message.content


# -- browsers, streams, limits --------------------------------------------------------------


def test_a_preflight_passes_for_an_allowed_origin_only(proxy: ProxyThread) -> None:
    asked = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}
    status, headers, _ = raw(proxy, "OPTIONS", "/v1/chat/completions",
                             headers={"Origin": ALLOWED, **asked})
    assert status == 204  # without the token: browsers send none with a preflight
    assert headers["access-control-allow-origin"] == ALLOWED
    assert "authorization" in headers["access-control-allow-headers"].lower()
    assert "POST" in headers["access-control-allow-methods"]
    status, headers, _ = raw(proxy, "OPTIONS", "/v1/chat/completions",
                             headers={"Origin": "http://evil.example", **asked})
    assert status == 403 and "access-control-allow-origin" not in headers

    body = {"messages": [ASK], "max_tokens": 2, "temperature": 0}
    status, headers, _ = raw(proxy, "POST", "/v1/chat/completions", body,
                             {"Origin": ALLOWED, **auth()})
    assert status == 200 and headers["access-control-allow-origin"] == ALLOWED
    status, headers, _ = raw(proxy, "POST", "/v1/chat/completions", body,
                             {"Origin": "http://evil.example", **auth()})
    assert "access-control-allow-origin" not in headers  # the browser withholds the answer
    status, _, _ = raw(proxy, "POST", "/v1/chat/completions", body, {"Origin": ALLOWED})
    assert status == 401  # only the preflight skips the token


def test_a_queued_stream_gets_headers_and_keepalives_before_its_first_token(
        proxy: ProxyThread) -> None:
    long = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True}
    blockers = [threading.Thread(target=raw, args=(proxy, "POST", "/v1/completions", long,
                                                   auth())) for _ in range(SLOTS)]
    for t in blockers:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while proxy.status()["target"]["slots_in_use"] < SLOTS:
            assert time.monotonic() < deadline, "the blocking requests never took the slots"
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=120)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"messages": [ASK], "max_tokens": 4, "temperature": 0, "stream": True}).encode(),
            {"Content-Type": "application/json", **auth()})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type").startswith(
            "text/event-stream")
        lines: list[bytes] = []
        queued_seen = False
        while (line := resp.readline()) and line.strip() != b"data: [DONE]":
            if line.strip():
                lines.append(line.strip())
            if line.startswith(b":") and not queued_seen:
                queued_seen = proxy.status()["target"]["queued"] >= 1
        conn.close()
    finally:
        for t in blockers:
            t.join(120)
    role = json.loads(lines[0][5:])
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    first_text = next(i for i, line in enumerate(lines) if line.startswith(b"data:")
                      and json.loads(line[5:])["choices"]
                      and json.loads(line[5:])["choices"][0]["delta"].get("content"))
    assert any(line == b": keep-alive" for line in lines[1:first_text]), lines[:first_text]
    assert queued_seen  # the comments came while the request waited for a slot


def test_a_clamp_is_said_in_a_header(proxy: ProxyThread) -> None:
    n_ctx = proxy.status()["target"]["n_ctx"]
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": "Hi", "max_tokens": 10 * n_ctx, "stream": True}).encode(),
        {"Content-Type": "application/json", **auth()})
    resp = conn.getresponse()
    said = resp.getheader(CLAMP_HEADER)
    conn.close()  # going away cancels the generation
    assert said is not None and said.startswith(f"requested={10 * n_ctx}; granted=")
    assert said.endswith("by=context")
    status, headers, _ = raw(proxy, "POST", "/v1/completions",
                             {"prompt": "Hi", "max_tokens": 2}, auth())
    assert status == 200 and CLAMP_HEADER.lower() not in headers


def test_developer_is_sent_as_system(proxy: ProxyThread, client: openai.OpenAI, model: str,
                                     servers: dict[str, LlamaServer]) -> None:
    ours = client.chat.completions.create(model=model, temperature=0, max_tokens=8, messages=[
        {"role": "developer", "content": "Be brief."}, ASK])
    theirs = servers["tools"].post("/v1/chat/completions", {"temperature": 0, "max_tokens": 8,
                                   "messages": [{"role": "system", "content": "Be brief."}, ASK]})
    assert ours.choices[0].message.content == theirs["choices"][0]["message"]["content"]


def test_reasoning_content_is_split_as_llama_server_splits_it(
        thinking_proxy: ProxyThread, servers: dict[str, LlamaServer]) -> None:
    """The template opens <think> in the prompt: the (random) answer is all reasoning, on the
    speculated path as on the coordinator's own endpoint."""
    body = {"messages": [ASK], "temperature": 0, "max_tokens": 24}
    conn = http.client.HTTPConnection("127.0.0.1", thinking_proxy.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                 {"Content-Type": "application/json"})
    ours = json.loads(conn.getresponse().read())
    conn.close()
    theirs = servers["thinking"].post("/v1/chat/completions", body)
    mine, its = ours["choices"][0]["message"], theirs["choices"][0]["message"]
    assert mine.get("reasoning_content") and mine.get("reasoning_content") == \
        its.get("reasoning_content")
    assert (mine.get("content") or "") == (its.get("content") or "")
    assert thinking_proxy.status()["stats"]["requests"] >= 1
    assert not thinking_proxy.status().get("passed_through")  # speculated, not passed on
