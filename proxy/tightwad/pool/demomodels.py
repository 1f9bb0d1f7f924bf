"""The demo pair: small llama-architecture GGUF models for the local pool and the tests.

The models have deterministic random weights and a REAL tokenizer copied from one of
llama.cpp's vocab-only files (``models/ggml-vocab-<name>.gguf`` in the pinned tree), so
llama-server tokenizes, templates and detokenizes them exactly as it would a real model.

A target and its self-speculative draft come from the same :class:`ModelSpec`: the draft
keeps only the first ``keep_layers`` blocks and is otherwise byte-identical. Deeper target
layers can be scaled down so that the draft agrees with the target often but not always
(docs/architecture.md, a draft that behaves like a real one).

Two pairs: the test pair (TARGET_SPEC, DRAFT_SPEC; :func:`ensure_demo_pair`), small so that the
test suite stays fast, and the demo pair (DEMO_TARGET, DEMO_DRAFT; :func:`ensure_local_pair`),
what the demo and ``tightwad start --local`` serve: a deeper target and a draft whose output
matrix is quantized (:class:`Encoding`), so that the draft is cheap next to its target.
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
from typing import Any, Literal, NamedTuple, Union

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import quantize

__all__ = [
    "DEMO_DRAFT",
    "DEMO_TARGET",
    "DRAFT_SPEC",
    "TARGET_SPEC",
    "DemoPair",
    "Encoding",
    "ModelSpec",
    "cached_encoded",
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
# Bump when what an Encoding writes changes (cached_encoded's file names carry it).
ENCODING_VERSION = 1

BigDtype = Literal["f16", "f32"]
MatrixType = Literal["f32", "f16", "q8_0", "q4_0"]
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


@dataclass(frozen=True)
class Encoding:
    """How a model's matrices are stored (norms stay f32); part of a cached file's identity."""

    matrices: MatrixType = "f32"  # the blocks' weights
    output: MatrixType | None = None  # output.weight; None: as token_embd (ModelSpec.big_dtype)

    @property
    def tag(self) -> str:
        return f"{self.matrices}-{self.output or 'big'}"


# The demo's and the local pool's pair (not the tests': their runtime stays that of the small
# pair above). With a 128k vocabulary the output matrix dominates a small model, and a
# layer-truncated draft shares it, so the draft would cost about what the target does. Here the
# target is deep enough that its layers weigh, and the draft reads its output matrix quantized.
# Measured with llama-server, 1 thread as the local pool runs it, on a loaded 2-core VM (ms per
# token, medians; 48-64 greedy tokens): this target (24 x 256, f16 matrices, f16 output) 47-72;
# drafts = its first 2 layers with the output matrix in q4_0: 7.5 (2.5-13), ratio 0.11-0.22,
# per-position greedy agreement with the target 0.69 (6 prompts x 64 tokens); in q8_0: ratio
# 0.20-0.24, agreement 0.77; in f16: ratio 0.52-0.80, agreement 0.78. The test pair above:
# ratio 1.05 (its draft reads the same 128k x 128 output matrix), agreement 0.72. Top-2 logit
# gap of this target: median 2.65, smallest 0.009 (greedy near-ties stay rare).
DEMO_TARGET_SPEC = ModelSpec(
    name="tightwad-demo-target",
    vocab="llama-bpe",
    n_layer=24,
    n_embd=256,
    n_head=8,
    n_head_kv=2,
    n_ff=1024,
    seed=3,
    output_scale=16.0,
    deep_layer_scale=0.05,
    n_core_layers=2,
)
DEMO_TARGET = (DEMO_TARGET_SPEC, Encoding(matrices="f16"))
DEMO_DRAFT = (DEMO_TARGET_SPEC.truncated(2, name="tightwad-demo-draft"),
              Encoding(matrices="f16", output="q4_0"))



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


class Raw(NamedTuple):
    """A tensor already in a quantized GGML layout (bytes per row), as gguf's quantizers give."""

    data: np.ndarray
    qtype: GGMLQuantizationType


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


_QTYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
    "q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}


def _encode(tensor: np.ndarray, kind: MatrixType) -> np.ndarray | Raw:
    if kind in ("f32", "f16"):
        return tensor.astype(np.float32 if kind == "f32" else np.float16)
    return Raw(quantize(tensor.astype(np.float32), _QTYPES[kind]), _QTYPES[kind])


def encoded_tensors(encoding: Encoding) -> Callable[[ModelSpec, int],
                                                    Iterator[tuple[str, np.ndarray | Raw]]]:
    """The standard random weights, stored as ``encoding`` says (token_embd as big_dtype)."""
    def tensors(spec: ModelSpec, n_vocab: int) -> Iterator[tuple[str, np.ndarray | Raw]]:
        for name, tensor in _tensors(spec, n_vocab):
            if name == "output.weight" and encoding.output is not None:
                yield name, _encode(tensor, encoding.output)
            elif name.startswith("blk.") and tensor.ndim == 2:
                yield name, _encode(tensor, encoding.matrices)
            else:
                yield name, tensor
    return tensors


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
            if isinstance(tensor, Raw):
                writer.add_tensor(name, tensor.data, raw_dtype=tensor.qtype)
            else:
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


def cached_encoded(spec: ModelSpec, encoding: Encoding, dest_dir: PathArg,
                   vocab_dir: PathArg) -> Path:
    """``spec`` stored as ``encoding``: ``dest_dir/<name>-<digest>-<encoding>.gguf``, written
    only if it does not exist yet."""
    path = (Path(dest_dir) / f"{spec.name}-{spec_digest(spec, vocab_dir)}-{encoding.tag}"
                             f"-v{ENCODING_VERSION}.gguf")
    if not path.is_file():  # files only ever appear complete (atomic rename)
        write_gguf(spec, path, _tokenizer_kvs(vocab_path(vocab_dir, spec.vocab)),
                   tensors=encoded_tensors(encoding))  # type: ignore[arg-type]
    return path


def ensure_demo_pair(dest_dir: PathArg, vocab_dir: PathArg) -> DemoPair:
    """The test suite's pair (TARGET_SPEC, DRAFT_SPEC), written once and cached by spec."""
    return DemoPair(target=cached_model(TARGET_SPEC, dest_dir, vocab_dir),
                    draft=cached_model(DRAFT_SPEC, dest_dir, vocab_dir))


def ensure_local_pair(dest_dir: PathArg, vocab_dir: PathArg) -> DemoPair:
    """The demo's and the local pool's pair (DEMO_TARGET, DEMO_DRAFT): a draft that is cheap
    next to its target, written once and cached."""
    return DemoPair(target=cached_encoded(*DEMO_TARGET, dest_dir, vocab_dir),
                    draft=cached_encoded(*DEMO_DRAFT, dest_dir, vocab_dir))
