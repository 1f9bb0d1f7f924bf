"""The llama-server clients (tightwad.llamaserver.client, .blocking), the parsers the pool tools
use (tightwad.llamaserver.wire) and the tokenizer facts built on them
(tightwad.llamaserver.vocab), against real servers; failures come from real sockets."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tightwad import build as llama_build
from tightwad.decoding.sampling import SamplingParams
from tightwad.llamaserver import blocking, wire
from tightwad.llamaserver.client import LlamaClient
from tightwad.llamaserver.vocab import check_tokenizers, eog_ids
from tightwad.llamaserver.wire import CompletionRequest, UpstreamDown, UpstreamError, UpstreamTimeout
from tightwad.pool import discovery
from tightwad.pool.procs import LlamaServer, free_port


def run(server: LlamaServer, body: Callable[[LlamaClient], Awaitable[Any]],
        timeout_s: float = 60) -> Any:
    """Run ``body`` with a client for ``server`` on a fresh event loop."""
    async def main() -> Any:
        client = LlamaClient(server.url, name="target", timeout_s=timeout_s)
        try:
            return await body(client)
        finally:
            await client.close()
    return asyncio.run(main())


def test_server_facts_and_text_round_trip(spec_pool) -> None:
    async def body(c: LlamaClient) -> Any:
        props = await c.props()
        ids = await c.tokenize("Hello 東京 😀")
        text = await c.detokenize(ids[1:])
        templated = await c.apply_template([{"role": "user", "content": "hi"}])
        return props, ids, text, templated, await c.health()

    props, ids, text, templated, healthy = run(spec_pool.coordinator, body)
    assert props.total_slots == 4 and props.n_ctx > 0 and props.n_vocab == 128256
    assert props.bos_token == "<|begin_of_text|>" and props.model.endswith(".gguf")
    assert ids[0] == 128000 and text == "Hello 東京 😀"
    assert "hi" in templated and healthy


def test_completion_stream_and_verify_agree(spec_pool) -> None:
    async def body(c: LlamaClient) -> Any:
        prompt = await c.tokenize("Once upon a time")
        whole = await c.complete(CompletionRequest(prompt=prompt, n_predict=12, n_probs=2))
        chunks = [ch async for ch in c.stream(CompletionRequest(prompt=prompt, n_predict=12))]
        # Warm slot 3 with the prompt, then verify 4 of the greedy tokens in one pass.
        await c.complete(CompletionRequest(prompt=prompt, n_predict=1, id_slot=3))
        check = await c.verify(prompt, list(whole.tokens[:4]), n_probs=2, id_slot=3)
        return prompt, whole, chunks, check

    prompt, whole, chunks, check = run(spec_pool.coordinator, body)
    assert len(whole.tokens) == 12 and whole.stop_type == "limit"
    assert all(len(p.top) == 2 for p in whole.probs)
    assert "".join(ch.content for ch in chunks) == whole.content
    assert chunks[-1].stop and chunks[-1].n_predicted == 12
    assert check.has_prompt_probs and len(check.prompt_probs) == 4
    assert [p.token.id for p in check.prompt_probs] == list(whole.tokens[:4])
    assert [p.top[0].id for p in check.prompt_probs] == list(whole.tokens[:4])
    assert check.tokens == (whole.tokens[4],)
    assert check.timings.prompt_n == 5 and check.timings.cache_n == len(prompt) - 1


def test_pinned_sampling_chain_ignores_the_servers_own_defaults(spec_pool, procs,
                                                               models) -> None:
    prompt = spec_pool.drafter.post("/tokenize", {"content": "1, 2, 3, 5, 8,",
                                                  "add_special": True})["tokens"]

    def greedy(server: LlamaServer) -> tuple[int, ...]:
        return run(server, lambda c: c.complete(CompletionRequest(prompt=prompt, n_predict=16)))\
            .tokens

    want = greedy(spec_pool.drafter)
    # Same model, but this server's defaults ban the first greedy token and penalise repeats.
    odd = procs.llama_server(models.draft, name="biased", args=[
        "--logit-bias", f"{want[0]}-100", "--repeat-penalty", "1.8"])
    stock = odd.post("/completion", {"prompt": prompt, "n_predict": 16, "temperature": 0,
                                     "return_tokens": True})["tokens"]
    assert stock[0] != want[0], "the server flags had no effect to guard against"
    assert greedy(odd) == want


def test_errors_are_typed(spec_pool) -> None:
    async def refused() -> None:
        c = LlamaClient(f"http://127.0.0.1:{free_port()}", name="drafter", timeout_s=2)
        try:
            await c.props()
        finally:
            await c.close()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers; returns when the client gives up and hangs up
        writer.close()

    async def silent() -> None:
        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        c = LlamaClient(f"http://127.0.0.1:{port}", name="drafter", timeout_s=0.3)
        try:
            await c.complete(CompletionRequest(prompt=[1, 2], n_predict=1))
        finally:
            await c.close()
            server.close()
            await server.wait_closed()

    with pytest.raises(UpstreamDown) as down:
        asyncio.run(refused())
    assert down.value.server == "drafter"
    with pytest.raises(UpstreamTimeout):
        asyncio.run(silent())
    with pytest.raises(UpstreamError) as err:  # more than --verify-max-tokens
        run(spec_pool.coordinator, lambda c: c.verify(list(range(1, 50)), list(range(50, 90))))
    assert err.value.status == 400 and "verify-max-tokens" in err.value.message


def test_tokenizer_check_and_end_of_generation_ids(spec_pool, procs, models) -> None:
    foreign = procs.llama_server(models.foreign, name="foreign")

    async def body() -> Any:
        clients = [LlamaClient(s.url, name=n, timeout_s=30) for s, n in
                   ((spec_pool.coordinator, "target"), (spec_pool.drafter, "drafter"),
                    (foreign, "foreign"))]
        try:
            target, drafter, other = clients
            tp, dp, fp = [await c.props() for c in clients]
            same = await check_tokenizers(target, tp, drafter, dp)
            different = await check_tokenizers(target, tp, other, fp)
            return same, different, await eog_ids(target, tp), await eog_ids(other, fp)
        finally:
            for c in clients:
                await c.close()

    same, different, target_eog, foreign_eog = asyncio.run(body())
    assert same.match and same.target_fingerprint == same.drafter_fingerprint
    assert not different.match and "vocabulary size" in different.reason
    assert {128001, 128009} <= target_eog  # <|end_of_text|>, <|eot_id|>
    assert len(foreign_eog) >= 1 and not foreign_eog & target_eog


def test_sampling_request_carries_the_chain(spec_pool) -> None:
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1)
    body = CompletionRequest(prompt=[1], n_predict=1, sampling=params, seed=2 ** 40 + 3,
                             prompt_logprobs=0).body(stream=False)
    assert body["samplers"] == ["top_k", "top_p", "min_p", "temperature"]
    assert body["repeat_penalty"] == 1.0 and body["seed"] == 3
    assert "prompt_logprobs" not in body  # a stock server sees a stock request
    res = run(spec_pool.drafter, lambda c: c.complete(CompletionRequest(
        prompt=[128000, 9906], n_predict=8, sampling=params, seed=11, n_probs=5)))
    again = run(spec_pool.drafter, lambda c: c.complete(CompletionRequest(
        prompt=[128000, 9906], n_predict=8, sampling=params, seed=11, n_probs=5)))
    assert res.tokens == again.tokens and len(res.tokens) == 8  # the seed reaches the server


def test_pool_tools_read_a_live_server(spec_pool, models, bin_dir: Path) -> None:
    """What discovery, doctor and swap read from a llama-server, through the blocking client,
    agrees with the async client's view and with the pin."""
    coordinator = spec_pool.coordinator
    found = discovery.identify_http(coordinator.host, coordinator.port)
    assert found is not None and (found.kind, found.healthy, found.slots) == (
        "llama-server", True, 4)
    assert found.model == str(models.target) and found.n_ctx and found.n_ctx > 0
    assert wire.parse_build_info(found.build) == llama_build.PIN_SHORT
    props = wire.parse_props(blocking.get_json(f"{coordinator.url}/props"),
                             blocking.get_json(f"{coordinator.url}/v1/models"))
    assert props == run(coordinator, lambda c: c.props())
    slots = wire.parse_slots(blocking.get_json(f"{coordinator.url}/slots"))
    assert [s.id for s in slots] == [0, 1, 2, 3] and not any(s.processing for s in slots)
    for binary, proto in (("llama-server", None), ("ggml-rpc-server", "v")):
        done = subprocess.run([str(bin_dir / binary), "--version"], capture_output=True,
                              text=True, timeout=30)
        version = wire.parse_version(done.stdout + done.stderr)
        assert version.commit == llama_build.PIN_SHORT, (binary, done.stderr)
        assert (version.rpc_protocol or "")[:1] == (proto or ""), version
    with pytest.raises(UpstreamError) as err:
        blocking.get_json(f"{coordinator.url}/no-such-endpoint")
    assert err.value.status == 404 and err.value.message == "File Not Found"
