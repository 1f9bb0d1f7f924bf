"""Pooling is correct: a 2-worker RPC pool generates exactly what one plain server generates."""

from __future__ import annotations

import re

import pytest

from tightwad.pool.procs import LlamaServer

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "東京の天気は",  # multibyte text through the real tokenizer
    "1, 2, 3, 5, 8,",
]
N_PREDICT = 64


def greedy(server: LlamaServer, prompt: str) -> dict:
    return server.post("/completion", {
        "prompt": prompt, "n_predict": N_PREDICT, "temperature": 0, "top_k": 1, "seed": 1,
        "cache_prompt": False, "ignore_eos": True, "return_tokens": True,
    })


def buffers(log: str, kind: str) -> dict[str, float]:
    """Per-device buffer sizes (MiB) as the coordinator itself reports them at load time."""
    pattern = rf"(\S+) {kind} buffer size =\s+([\d.]+) MiB"
    return {name: float(size) for name, size in re.findall(pattern, log)}


@pytest.mark.parametrize("prompt", PROMPTS)
def test_pool_generates_what_a_single_server_generates(pool, single: LlamaServer,
                                                       prompt: str) -> None:
    pooled, alone = greedy(pool.coordinator, prompt), greedy(single, prompt)
    assert len(alone["tokens"]) == N_PREDICT
    assert pooled["tokens"] == alone["tokens"]
    assert pooled["content"] == alone["content"]


def test_prompts_give_different_continuations(single: LlamaServer) -> None:
    # Guards the equality test against a degenerate model that always says the same thing.
    outputs = {tuple(greedy(single, p)["tokens"]) for p in PROMPTS}
    assert len(outputs) == len(PROMPTS)


def test_layers_are_placed_on_both_workers(pool) -> None:
    log = pool.coordinator.log_text()
    offloaded = re.search(r"offloaded (\d+)/(\d+) layers to GPU", log)
    assert offloaded and offloaded.group(1) == offloaded.group(2), "not every layer offloaded"
    model, kv = buffers(log, "model"), buffers(log, "KV")
    for worker in pool.workers:
        on_worker = [name for name in model if worker.endpoint in name]
        assert on_worker and all(model[n] > 0 for n in on_worker), f"no weights on {worker.endpoint}: {model}"
        # A device holds KV cache only for the layers it runs.
        assert any(worker.endpoint in n and size > 0 for n, size in kv.items()), \
            f"no layers on {worker.endpoint}: {kv}"


def test_drafter_shares_the_targets_tokenizer(pool, procs, models) -> None:
    text = {"content": "Tightwad pools junk: 東京 🚀 résumé"}
    target_ids = pool.coordinator.post("/tokenize", text)["tokens"]
    assert pool.drafter.post("/tokenize", text)["tokens"] == target_ids
    foreign = procs.llama_server(models.foreign, name="foreign")
    assert foreign.post("/tokenize", text)["tokens"] != target_ids
