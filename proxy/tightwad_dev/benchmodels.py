"""A benchmark model pair: a target and a cheap self-speculative draft that agree realistically.

Random weights give a draft that is either as expensive as the target (a quantized copy) or
almost never right (an independent small model) (docs/architecture.md, a draft that behaves like
a real one). What behaves like a real pair is a target whose first layers carry the signal and
whose deeper layers only perturb it (``deep_layer_scale``), with the draft = the target's first
layers plus the same embeddings and output matrix. A small byte-level BPE vocabulary (256 byte
tokens + a few hundred merges + chat special tokens, written here) keeps the output matrix from
dominating the cost, so the draft's cost ratio c really is about ``keep_layers / n_layer``.

The tokenizer is a real GPT-2-style BPE that llama.cpp loads (``tokenizer.ggml.model = gpt2``,
``pre = gpt-2``): ``/tokenize``, ``/detokenize`` and ``/apply-template`` (ChatML) work, and any
UTF-8 text tokenizes (every byte has a token). The merges are learned, deterministically, from
the small English corpus below.

Files are cached by a hash of everything that determines their bytes and written atomically::

    pair = ensure_bench_models(Path("~/.cache/tightwad/models").expanduser())
    pair.target, pair.draft

The real-vocabulary pair (:func:`ensure_real_vocab_models`) has Llama 3's 128k tokenizer
(``llama-bpe`` from the pinned tree's ``models/``), as every model people pool has a 32k-262k
vocabulary: a verify then pulls ``n_outputs x n_vocab x 4`` bytes of logits over the pool's link,
and the draft's own 128k output matrix is a large part of its cost (issue 14 separates the two).
Its target is wide and deep enough that its layers, not its output matrix, dominate a step, as
far as 2 CPU cores allow a benchmark of tens of minutes; the draft is its first 2 layers.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from tightwad.pool.demomodels import (
    DRAFT_SPEC,
    TARGET_SPEC,
    ModelSpec,
    _KeyValue,
    _tensors,
    _tokenizer_kvs,
    cached_model,
    spec_digest,
    vocab_path,
    write_gguf,
)

__all__ = [
    "BENCH_DRAFT_SPEC",
    "BENCH_TARGET_SPEC",
    "BenchPair",
    "REAL_VOCAB_DRAFT_SPEC",
    "REAL_VOCAB_TARGET_SPEC",
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "bench_digest",
    "byte_bpe_vocab",
    "ensure_bench_models",
    "ensure_real_vocab_models",
    "write_bench_model",
]

# Bump when the bytes written for an unchanged spec change.
BENCH_FORMAT_VERSION = 1

N_MERGES = 170  # 256 bytes + 170 merges + 3 special tokens = 429 tokens (docs/architecture.md: ~430)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Token types of llama.cpp (llama_token_type): NORMAL = 1, CONTROL = 3.
_NORMAL, _CONTROL = 1, 3

CORPUS = """\
A pool of old machines can serve one large language model when every machine holds a few of
its layers. The coordinator sends the hidden state of each token to the first worker, which
passes the result to the next one, and the last worker returns the logits. On a slow network
every generated token pays one round trip per worker, so the pool is only as fast as the link.
Speculative decoding hides that cost: a small draft model proposes several tokens, and the
large model checks all of them in a single forward pass. When the draft is right, the pool
emits many tokens for the price of one; when it is wrong, the large model's own token is kept,
so the output is exactly what the large model would have written alone.
The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away, there lived
a king who had three daughters. The weather today is sunny with a light wind from the west, and
the temperature will reach twenty degrees in the afternoon. Please write a short story about a
robot that learns to cook, and explain the steps of the recipe in plain words.
def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)
for i in range(10):
    print(i, fibonacci(i))
The user asked the assistant a question, and the assistant answered with a clear and helpful
reply. It is important to measure things before believing them, and to write down how they
were measured so that anyone can run the same test again and compare the numbers.
"""

# GPT-2's pre-tokenizer, approximated with the standard library's re (no \\p classes): the
# merges only need to be valid pairs; llama.cpp applies them with its own pre-tokenizer.
_PRETOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+")




def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the BPE's alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = dict(zip(keep, keep))
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in sorted(chars.items())}


def _learn_merges(corpus: str, n_merges: int) -> list[tuple[str, str]]:
    """Byte-level BPE training: repeatedly merge the most frequent adjacent pair (ties: the
    lexicographically smallest pair, so the result is deterministic)."""
    alphabet = _bytes_to_unicode()
    words = collections.Counter(
        tuple(alphabet[b] for b in piece.encode()) for piece in _PRETOKEN.findall(corpus))
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best_count = max(pairs.values())
        best = min(pair for pair, count in pairs.items() if count == best_count)
        merges.append(best)
        merged: collections.Counter[tuple[str, ...]] = collections.Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def byte_bpe_vocab(n_merges: int = N_MERGES) -> tuple[_KeyValue, ...]:
    """The tokenizer metadata of the byte-level BPE vocabulary, as GGUF key/values."""
    alphabet = _bytes_to_unicode()
    merges = _learn_merges(CORPUS, n_merges)
    tokens = [alphabet[b] for b in range(256)]
    seen = set(tokens)
    for left, right in merges:
        if left + right not in seen:  # two merge paths can build the same string
            tokens.append(left + right)
            seen.add(left + right)
    types = [_NORMAL] * len(tokens) + [_CONTROL] * len(SPECIAL_TOKENS)
    eot = len(tokens)  # <|endoftext|>
    tokens += SPECIAL_TOKENS
    im_end = tokens.index("<|im_end|>")
    string, array, u32 = GGUFValueType.STRING, GGUFValueType.ARRAY, GGUFValueType.UINT32
    return (
        _KeyValue("tokenizer.ggml.model", "gpt2", string),
        _KeyValue("tokenizer.ggml.pre", "gpt-2", string),
        _KeyValue("tokenizer.ggml.tokens", tokens, array, string),
        _KeyValue("tokenizer.ggml.token_type", types, array, GGUFValueType.INT32),
        _KeyValue("tokenizer.ggml.merges", [f"{a} {b}" for a, b in merges], array, string),
        _KeyValue("tokenizer.ggml.bos_token_id", eot, u32),
        _KeyValue("tokenizer.ggml.eos_token_id", im_end, u32),
        _KeyValue("tokenizer.ggml.padding_token_id", eot, u32),
        _KeyValue("tokenizer.ggml.add_bos_token", True, GGUFValueType.BOOL),
        _KeyValue("tokenizer.chat_template", CHAT_TEMPLATE, string),
    )


BENCH_TARGET_SPEC = ModelSpec(
    name="tightwad-bench-target",
    vocab="byte-bpe",  # written by byte_bpe_vocab, not read from llama.cpp's models/
    n_layer=16,
    n_embd=512,
    n_head=8,
    n_head_kv=8,
    n_ff=1024,
    seed=11,
    # Peaked output distributions: greedy near-ties (batch-vs-single float noise, docs/architecture.md)
    # stay rare.
    output_scale=16.0,
    deep_layer_scale=0.07,
    n_core_layers=2,
)
BENCH_DRAFT_SPEC = BENCH_TARGET_SPEC.truncated(2, name="tightwad-bench-draft")


# Per token: 24 layers x ~15.2M multiply-adds (attention with 4 KV heads of 16, ffn 4096) =
# 365M, against 131M for the 128k x 1024 output matrix: the layers are ~3/4 of a target step.
# The draft (2 layers + the same output) costs ~161M: its output matrix is ~80% of its cost,
# which is what a real small draft with a 128k vocabulary looks like too.
REAL_VOCAB_TARGET_SPEC = ModelSpec(
    name="tightwad-bench-real-vocab-target",
    vocab="llama-bpe",
    n_layer=24,
    n_embd=1024,
    n_head=16,
    n_head_kv=4,
    n_ff=4096,
    seed=13,
    output_scale=16.0,
    deep_layer_scale=0.05,
    n_core_layers=2,
)
REAL_VOCAB_DRAFT_SPEC = REAL_VOCAB_TARGET_SPEC.truncated(2, name="tightwad-bench-real-vocab-draft")


@dataclass(frozen=True)
class BenchPair:
    target: Path
    draft: Path
    target_spec: ModelSpec
    draft_spec: ModelSpec


def _bench_tensors(spec: ModelSpec, n_vocab: int) -> Iterator[tuple[str, np.ndarray]]:
    # Matrices in f16 (norms stay f32): half the bytes to push to the RPC workers.
    for name, tensor in _tensors(spec, n_vocab):
        yield name, tensor.astype(np.float16) if tensor.ndim == 2 else tensor


def write_bench_model(spec: ModelSpec, path: Path, n_merges: int = N_MERGES) -> Path:
    """Write ``spec`` with the byte-level BPE vocabulary at ``path`` atomically."""
    return write_gguf(spec, path, byte_bpe_vocab(n_merges), tensors=_bench_tensors)


def bench_digest(spec: ModelSpec, n_merges: int = N_MERGES) -> str:
    """Short hash of everything that determines a bench model file's bytes."""
    vocab = [dataclasses.astuple(kv) for kv in byte_bpe_vocab(n_merges)]
    identity = {"format": BENCH_FORMAT_VERSION, "numpy": np.__version__,
                "spec": dataclasses.asdict(spec),
                "vocab": hashlib.sha256(repr(vocab).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def _cached(spec: ModelSpec, dest_dir: Path) -> Path:
    path = dest_dir / f"{spec.name}-{bench_digest(spec)}.gguf"
    if not path.is_file():  # files only ever appear complete (atomic rename)
        write_bench_model(spec, path)
    return path


def ensure_bench_models(dest_dir: Path, target_spec: ModelSpec = BENCH_TARGET_SPEC,
                        keep_layers: int | None = None) -> BenchPair:
    """The bench target and its layer-truncated draft, cached under ``dest_dir``."""
    draft_spec = (BENCH_DRAFT_SPEC if target_spec == BENCH_TARGET_SPEC and keep_layers is None
                  else target_spec.truncated(keep_layers or target_spec.n_core_layers or 1,
                                             name=f"{target_spec.name}-draft"))
    return BenchPair(target=_cached(target_spec, dest_dir), draft=_cached(draft_spec, dest_dir),
                     target_spec=target_spec, draft_spec=draft_spec)


def ensure_real_vocab_models(dest_dir: Path, vocab_dir: Path, tiny: bool = False) -> BenchPair:
    """The real-vocabulary pair (128k llama-bpe tokenizer read from ``vocab_dir``, the pinned
    tree's ``models/``), cached under ``dest_dir``; ``tiny``: the demo pair (same tokenizer,
    8 layers x 128), for smoke tests."""
    if tiny:
        return BenchPair(target=cached_model(TARGET_SPEC, dest_dir, vocab_dir),
                         draft=cached_model(DRAFT_SPEC, dest_dir, vocab_dir),
                         target_spec=TARGET_SPEC, draft_spec=DRAFT_SPEC)
    return BenchPair(target=_cached_real(REAL_VOCAB_TARGET_SPEC, dest_dir, vocab_dir),
                     draft=_cached_real(REAL_VOCAB_DRAFT_SPEC, dest_dir, vocab_dir),
                     target_spec=REAL_VOCAB_TARGET_SPEC, draft_spec=REAL_VOCAB_DRAFT_SPEC)


def _cached_real(spec: ModelSpec, dest_dir: Path, vocab_dir: Path) -> Path:
    """A real-vocabulary bench model with f16 matrices (as the small-vocabulary pair: half the
    bytes to read per token and to push to the RPC workers), cached by spec and vocab file."""
    path = dest_dir / f"{spec.name}-{spec_digest(spec, vocab_dir)}-f16v{BENCH_FORMAT_VERSION}.gguf"
    if not path.is_file():  # files only ever appear complete (atomic rename)
        write_gguf(spec, path, _tokenizer_kvs(vocab_path(vocab_dir, spec.vocab)),
                   tensors=_bench_tensors)
    return path
