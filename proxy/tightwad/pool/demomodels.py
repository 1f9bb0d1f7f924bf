"""The demo pair: small llama-architecture GGUF models for the local pool and the tests.

The models have deterministic random weights and a REAL tokenizer copied from one of
llama.cpp's vocab-only files (``models/ggml-vocab-<name>.gguf`` in the pinned tree), so
llama-server tokenizes, templates and detokenizes them exactly as it would a real model.

A target and its self-speculative draft come from the same :class:`ModelSpec`: the draft
keeps only the first ``keep_layers`` blocks and is otherwise byte-identical. Deeper target
layers can be scaled down so that the draft agrees with the target often but not always
(docs/architecture.md, a draft that behaves like a real one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

__all__ = [
    "DRAFT_SPEC",
    "TARGET_SPEC",
    "DemoPair",
    "ModelSpec",
    "cached_model",
    "ensure_demo_pair",
    "read_gguf",
    "spec_digest",
    "vocab_fingerprint",
    "vocab_path",
    "write_model",
]

ARCH = "llama"

# Bump when the bytes written for an unchanged spec change (weight init, metadata, layout),
# so that files cached under the old scheme are not reused.
FORMAT_VERSION = 1

BigDtype = Literal["f16", "f32"]
PathArg = Union[str, "os.PathLike[str]"]
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"invalid ModelSpec: {message}")


@dataclass(frozen=True)
class ModelSpec:
    """Everything that determines a model file's bytes (together with the vocab file)."""

    name: str = "tightwad-test"
    vocab: str = "llama-bpe"  # models/ggml-vocab-<vocab>.gguf
    n_layer: int = 8
    n_embd: int = 128
    n_head: int = 4
    n_head_kv: int = 4
    n_ff: int = 256
    context_length: int = 4096
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    seed: int = 0
    # Logit spread: logits have std ~= output_scale, so larger values make greedy ties rare.
    output_scale: float = 1.0
    # Layers >= n_core_layers get attn_output/ffn_down scaled by deep_layer_scale, so they
    # only perturb the residual stream that the first layers set up (docs/architecture.md).
    deep_layer_scale: float = 1.0
    n_core_layers: int = 0
    # None: all layers. k: write only blocks 0..k-1 (a layer-truncated draft).
    keep_layers: int | None = None
    # token_embd and output dominate the file size at 100k+ vocabularies.
    big_dtype: BigDtype = "f16"

    def __post_init__(self) -> None:
        _require(self.n_layer >= 1, "n_layer must be >= 1")
        _require(self.n_embd % self.n_head == 0, "n_embd must be a multiple of n_head")
        _require(self.n_head % self.n_head_kv == 0, "n_head must be a multiple of n_head_kv")
        _require((self.n_embd // self.n_head) % 2 == 0, "the head size must be even (RoPE)")
        _require(self.n_ff >= 1, "n_ff must be >= 1")
        _require(self.context_length >= 1, "context_length must be >= 1")
        _require(0 <= self.n_core_layers <= self.n_layer, "n_core_layers must be in 0..n_layer")
        if self.keep_layers is not None:
            _require(1 <= self.keep_layers <= self.n_layer, "keep_layers must be in 1..n_layer")
        _require(self.big_dtype in ("f16", "f32"), "big_dtype must be 'f16' or 'f32'")
        # Both end up in file names.
        _require(_PLAIN_NAME.fullmatch(self.name) is not None, "name must be a plain file name")
        _require(_PLAIN_NAME.fullmatch(self.vocab) is not None, "vocab must be a name like 'qwen2'")

    @property
    def n_written_layers(self) -> int:
        return self.n_layer if self.keep_layers is None else self.keep_layers

    def truncated(self, keep_layers: int, name: str | None = None) -> ModelSpec:
        """The self-speculative draft of this model: its first ``keep_layers`` blocks."""
        name = name or f"{self.name}-draft{keep_layers}"
        return dataclasses.replace(self, keep_layers=keep_layers, name=name)


@dataclass(frozen=True)
class DemoPair:
    """The local pool's target and its same-tokenizer draft (the target's first layers)."""

    target: Path
    draft: Path


TARGET_SPEC = ModelSpec(
    name="tightwad-test-target",
    vocab="llama-bpe",
    n_layer=8,
    n_embd=128,
    n_head=4,
    n_head_kv=2,
    n_ff=256,
    seed=1,
    # Measured with llama-server (6 prompts x 64 greedy tokens): top-2 logit gap median 2.3,
    # smallest 0.0035, above the ~2e-3 batch-vs-single numeric noise (docs/architecture.md,
    # verify numerics). Sampling tests that want flatter distributions can raise the temperature.
    output_scale=16.0,
    # Per-position greedy agreement of DRAFT_SPEC with this target: 0.71 (measured, same run).
    deep_layer_scale=0.1,
    n_core_layers=2,
)
DRAFT_SPEC = TARGET_SPEC.truncated(2, name="tightwad-test-draft")



# ---------------------------------------------------------------------------------------------
# Reading GGUF files


class _PlainArrayReader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memmap.

    GGUFReader slices its buffer a few times per array element; slicing an np.memmap runs
    Python-level finalizers each time, which makes a 128k-token vocabulary ~3x slower to
    parse. A plain view of the same mapping reads the same bytes.
    """

    @property  # type: ignore[override]
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain = value.view(np.ndarray)


def read_gguf(path: PathArg) -> GGUFReader:
    """Open a GGUF file read-only with the gguf package's reader."""
    return _PlainArrayReader(path, "r")


def _field_bytes(reader: GGUFReader, key: str) -> list[bytes]:
    field = reader.fields[key]
    return [bytes(field.parts[i]) for i in field.data]


def vocab_fingerprint(source: PathArg | GGUFReader) -> str:
    """Identity of a GGUF's tokenizer: sha256 over tokenizer model, pre-tokenizer and tokens.

    Two models with equal fingerprints map text to the same token ids, which is what a
    draft needs to share with its target. ``source`` is a path or an already open reader
    (parsing a 100k+ token vocabulary takes seconds).
    """
    if not isinstance(source, GGUFReader):
        # The same digest, read with the standard library only (and ~10x faster):
        # tightwad.pool.gguf_info is what doctor uses on the controller.
        from tightwad.pool.gguf_info import vocab_fingerprint as from_file

        return from_file(source)
    reader = source
    if "tokenizer.ggml.tokens" not in reader.fields:
        where = "this GGUF" if isinstance(source, GGUFReader) else str(source)
        raise ValueError(f"{where}: no tokenizer.ggml.tokens; is it a model or vocab file?")
    digest = hashlib.sha256()
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
        value = _field_bytes(reader, key)[0] if key in reader.fields else b""
        digest.update(len(value).to_bytes(8, "little") + value)
    tokens = _field_bytes(reader, "tokenizer.ggml.tokens")
    digest.update(len(tokens).to_bytes(8, "little"))
    for token in tokens:
        # Length-prefixed so that token boundaries are part of the identity.
        digest.update(len(token).to_bytes(8, "little") + token)
    return digest.hexdigest()


@dataclass(frozen=True)
class _KeyValue:
    key: str
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


def vocab_path(vocab_dir: PathArg, vocab: str) -> Path:
    """``vocab_dir/ggml-vocab-<vocab>.gguf``, which must exist."""
    path = Path(vocab_dir) / f"ggml-vocab-{vocab}.gguf"
    if not path.is_file():
        raise FileNotFoundError(
            f"vocab file {path} not found: vocab_dir must be the 'models' folder of the"
            " pinned llama.cpp source tree"
        )
    return path


def _tokenizer_kvs(path: Path) -> tuple[_KeyValue, ...]:
    stat = path.stat()
    return _tokenizer_kvs_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _tokenizer_kvs_cached(path: str, size: int, mtime_ns: int) -> tuple[_KeyValue, ...]:
    # size/mtime are part of the cache key so that a replaced file is read again.
    reader = read_gguf(path)
    kvs = tuple(_key_value(reader, key) for key in reader.fields if key.startswith("tokenizer."))
    if not any(kv.key == "tokenizer.ggml.tokens" for kv in kvs):
        raise ValueError(f"{path} has no tokenizer.ggml.tokens; not a vocab file")
    return kvs


def _key_value(reader: GGUFReader, key: str) -> _KeyValue:
    """A metadata field with its exact GGUF type, as GGUFWriter.add_key_value takes it."""
    field = reader.fields[key]
    vtype = field.types[0]
    if vtype == GGUFValueType.STRING:
        return _KeyValue(key, _field_bytes(reader, key)[0], vtype)
    if vtype != GGUFValueType.ARRAY:
        return _KeyValue(key, field.contents(), vtype)
    if len(field.types) != 2 or field.types[1] == GGUFValueType.ARRAY:
        raise ValueError(f"{key}: nested arrays are not supported")
    sub_type = field.types[1]
    # Strings stay bytes: GGUFWriter writes bytes verbatim, so nothing is re-encoded.
    value = _field_bytes(reader, key) if sub_type == GGUFValueType.STRING else field.contents()
    return _KeyValue(key, value, vtype, sub_type)


# ---------------------------------------------------------------------------------------------
# Weights


def _rng(seed: int, tensor_name: str) -> np.random.Generator:
    # Keyed by (seed, name) only, so a tensor's values do not depend on which other tensors
    # are written: a truncated draft gets exactly the target's weights.
    digest = hashlib.sha256(f"tightwad/{seed}/{tensor_name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _normal(spec: ModelSpec, name: str, shape: tuple[int, ...], scale: float) -> np.ndarray:
    values = _rng(spec.seed, name).standard_normal(shape, dtype=np.float32)
    # np.float32 scale: numpy 2 would promote to float64, which llama.cpp rejects.
    return values * np.float32(scale)


def _linear(spec: ModelSpec, name: str, n_out: int, n_in: int, gain: float = 1.0) -> np.ndarray:
    # Rows are outputs (GGUF ne0 = n_in); 1/sqrt(fan_in) keeps activations O(1) per layer.
    return _normal(spec, name, (n_out, n_in), gain / np.sqrt(n_in))


# (spec, n_vocab) -> the model's tensors in file order, with their final dtypes.
TensorSource = Callable[["ModelSpec", int], Iterator[tuple[str, np.ndarray]]]


def _tensors(spec: ModelSpec, n_vocab: int) -> Iterator[tuple[str, np.ndarray]]:
    """All tensors of the model, in file order, with their final dtypes."""
    big = np.float16 if spec.big_dtype == "f16" else np.float32
    norm = np.ones(spec.n_embd, dtype=np.float32)
    embeddings = _normal(spec, "token_embd.weight", (n_vocab, spec.n_embd), 1.0)
    yield "token_embd.weight", embeddings.astype(big)
    yield "output_norm.weight", norm
    output = _linear(spec, "output.weight", n_vocab, spec.n_embd, spec.output_scale)
    yield "output.weight", output.astype(big)
    for layer in range(spec.n_written_layers):
        yield from _block(spec, layer, norm)


def _block(spec: ModelSpec, layer: int, norm: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    head_dim = spec.n_embd // spec.n_head
    n_embd_kv = head_dim * spec.n_head_kv
    # Only the layer's contributions to the residual stream are scaled: its inputs stay O(1).
    residual_gain = 1.0 if layer < spec.n_core_layers else spec.deep_layer_scale
    shapes = {
        "attn_q": (spec.n_embd, spec.n_embd, 1.0),
        "attn_k": (n_embd_kv, spec.n_embd, 1.0),
        "attn_v": (n_embd_kv, spec.n_embd, 1.0),
        "attn_output": (spec.n_embd, spec.n_embd, residual_gain),
        "ffn_gate": (spec.n_ff, spec.n_embd, 1.0),
        "ffn_up": (spec.n_ff, spec.n_embd, 1.0),
        "ffn_down": (spec.n_embd, spec.n_ff, residual_gain),
    }
    yield f"blk.{layer}.attn_norm.weight", norm
    yield f"blk.{layer}.ffn_norm.weight", norm
    for kind, (n_out, n_in, gain) in shapes.items():
        name = f"blk.{layer}.{kind}.weight"
        yield name, _linear(spec, name, n_out, n_in, gain)


# ---------------------------------------------------------------------------------------------
# Writing


def _add_hparams(writer: GGUFWriter, spec: ModelSpec, n_vocab: int) -> None:
    writer.add_name(spec.name)
    writer.add_block_count(spec.n_written_layers)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.n_embd)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(spec.n_embd // spec.n_head)
    writer.add_rope_freq_base(spec.rope_base)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_vocab_size(n_vocab)
    file_type = LlamaFileType.MOSTLY_F16 if spec.big_dtype == "f16" else LlamaFileType.ALL_F32
    writer.add_file_type(int(file_type))


def _write_gguf(spec: ModelSpec, out: Path, tokenizer: Sequence[_KeyValue],
                tensors: TensorSource) -> None:
    n_vocab = len(next(kv.value for kv in tokenizer if kv.key == "tokenizer.ggml.tokens"))
    writer = GGUFWriter(out, ARCH)
    try:
        _add_hparams(writer, spec, n_vocab)
        for kv in tokenizer:
            writer.add_key_value(kv.key, kv.value, kv.vtype, kv.sub_type)
        for name, tensor in tensors(spec, n_vocab):
            writer.add_tensor(name, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def write_model(spec: ModelSpec, path: PathArg, vocab_dir: PathArg) -> Path:
    """Write ``spec`` as a GGUF at ``path``, atomically, and return the path.

    The same spec and vocab file always give the same bytes. The file is written next to
    its destination and renamed into place, so readers never see a half-written model.
    """
    return write_gguf(spec, Path(path), _tokenizer_kvs(vocab_path(vocab_dir, spec.vocab)))


def write_gguf(spec: ModelSpec, path: Path, tokenizer: Sequence[_KeyValue],
               tensors: TensorSource | None = None) -> Path:
    """Write ``spec`` with these tokenizer keys (and ``tensors(spec, n_vocab)``, default the
    standard random weights) at ``path``: next to it first, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write_gguf(spec, tmp, tokenizer, tensors or _tensors)
        # mkstemp makes files private; models are read by other users' services in the demo.
        os.chmod(tmp, 0o644)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


# ---------------------------------------------------------------------------------------------
# Cache


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def spec_digest(spec: ModelSpec, vocab_dir: PathArg) -> str:
    """Short hash of everything that determines the file's bytes."""
    identity = {
        "format": FORMAT_VERSION,
        # Generator streams are not guaranteed across numpy releases; a stale cached target
        # next to a freshly written draft would no longer share its weights.
        "numpy": np.__version__,
        "spec": dataclasses.asdict(spec),
        "vocab_sha256": _file_sha256(vocab_path(vocab_dir, spec.vocab)),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def cached_model(spec: ModelSpec, dest_dir: PathArg, vocab_dir: PathArg) -> Path:
    """``dest_dir/<name>-<digest>.gguf``, written only if it does not exist yet."""
    path = Path(dest_dir) / f"{spec.name}-{spec_digest(spec, vocab_dir)}.gguf"
    # Files only ever appear complete (atomic rename), so existence means usable.
    if not path.is_file():
        write_model(spec, path, vocab_dir)
    return path


def ensure_demo_pair(dest_dir: PathArg, vocab_dir: PathArg) -> DemoPair:
    """The demo target and its draft, written once and cached by spec."""
    return DemoPair(target=cached_model(TARGET_SPEC, dest_dir, vocab_dir),
                    draft=cached_model(DRAFT_SPEC, dest_dir, vocab_dir))
