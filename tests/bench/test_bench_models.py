"""The benchmark pair's byte-level BPE vocabulary and model files (no llama.cpp processes;
tests/test_bench_pool.py loads them into llama-server)."""

from __future__ import annotations

from pathlib import Path

from tightwad.pool.demomodels import ModelSpec, read_gguf, vocab_fingerprint
from tightwad_dev.benchmodels import (
    BENCH_DRAFT_SPEC,
    BENCH_TARGET_SPEC,
    SPECIAL_TOKENS,
    bench_digest,
    byte_bpe_vocab,
    ensure_bench_models,
)


def _kv(key: str):
    return next(kv for kv in byte_bpe_vocab() if kv.key == key).value


def test_vocab_is_a_complete_deterministic_byte_bpe() -> None:
    tokens, merges, types = (_kv("tokenizer.ggml.tokens"), _kv("tokenizer.ggml.merges"),
                             _kv("tokenizer.ggml.token_type"))
    assert byte_bpe_vocab() == byte_bpe_vocab()
    assert 400 <= len(tokens) <= 500 and len(set(tokens)) == len(tokens)
    assert len(types) == len(tokens)
    # Every byte has its own token, so any UTF-8 text tokenizes.
    assert len(set(tokens[:256])) == 256 and all(len(t) == 1 for t in tokens[:256])
    known = set(tokens)
    for merge in merges:  # each merge joins two tokens into a third
        left, right = merge.split(" ")
        assert left in known and right in known and left + right in known
    assert tuple(tokens[-len(SPECIAL_TOKENS):]) == SPECIAL_TOKENS
    assert _kv("tokenizer.ggml.eos_token_id") == tokens.index("<|im_end|>")
    assert "<|im_start|>" in _kv("tokenizer.chat_template")


def test_pair_shares_tokenizer_and_weights(tmp_path: Path) -> None:
    spec = ModelSpec(name="bench-unit", vocab="byte-bpe", n_layer=3, n_embd=32, n_head=2,
                     n_head_kv=2, n_ff=64, seed=3, deep_layer_scale=0.1, n_core_layers=1)
    pair = ensure_bench_models(tmp_path, spec, keep_layers=1)
    again = ensure_bench_models(tmp_path, spec, keep_layers=1)
    assert (pair.target, pair.draft) == (again.target, again.draft)  # cached by digest
    target, draft = read_gguf(pair.target), read_gguf(pair.draft)
    assert vocab_fingerprint(target) == vocab_fingerprint(draft)
    t = {x.name: bytes(x.data) for x in target.tensors}
    d = {x.name: bytes(x.data) for x in draft.tensors}
    assert set(d) < set(t) and all(d[name] == t[name] for name in d)
    assert not any(name.startswith("blk.1.") for name in d)
    assert bench_digest(BENCH_TARGET_SPEC) != bench_digest(BENCH_DRAFT_SPEC)


def test_real_vocab_pair_is_dominated_by_its_layers() -> None:
    """The real-vocabulary target's step is mostly its layers, not its 128k output matrix (per
    token multiply-adds), and its draft is its first layers with the same tokenizer."""
    from tightwad_dev.benchmodels import REAL_VOCAB_DRAFT_SPEC, REAL_VOCAB_TARGET_SPEC

    t = REAL_VOCAB_TARGET_SPEC
    kv = t.n_embd // t.n_head * t.n_head_kv
    per_layer = 2 * t.n_embd * t.n_embd + 2 * t.n_embd * kv + 3 * t.n_embd * t.n_ff
    output = 128_256 * t.n_embd  # llama-bpe
    assert t.vocab == "llama-bpe"
    assert t.n_layer * per_layer > 2 * output
    d = REAL_VOCAB_DRAFT_SPEC
    assert (d.vocab, d.keep_layers, d.n_embd, d.seed) == ("llama-bpe", t.n_core_layers,
                                                          t.n_embd, t.seed)
