"""What ``doctor`` needs to know about a GGUF file, read with the standard library only.

Reads the header and the metadata key/values (never the tensor data), so it is fast on a
40 GB model and needs neither numpy nor the ``gguf`` package on the controller:
architecture, layer and head counts (for the KV-cache estimate), the tokenizer, and a
fingerprint of the vocabulary that is byte-for-byte the one of
``tightwad.pool.demomodels.vocab_fingerprint``.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

PathArg = Union[str, "os.PathLike[str]"]
MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

# GGUF value types
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)
_SCALARS = {_U8: "<B", _I8: "<b", _U16: "<H", _I16: "<h", _U32: "<I", _I32: "<i",
            _F32: "<f", _BOOL: "<?", _U64: "<Q", _I64: "<q", _F64: "<d"}
# Arrays we keep in full (everything else is skipped or summarised by its length).
_KEEP_ARRAYS = {"tokenizer.ggml.tokens"}


class GGUFError(ValueError):
    """Not a (readable) GGUF file; the message says what is wrong."""


@dataclass
class GGUFInfo:
    path: Path
    size: int
    version: int
    n_tensors: int
    metadata: dict[str, Any] = field(default_factory=dict)
    """Scalars and strings as values; arrays as their full list (tokens) or their length."""
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def tokenizer_model(self) -> str:
        return str(self.metadata.get("tokenizer.ggml.model", ""))

    @property
    def tokenizer_pre(self) -> str:
        return str(self.metadata.get("tokenizer.ggml.pre", ""))

    @property
    def n_vocab(self) -> int:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        return len(tokens) if isinstance(tokens, list) else 0

    def vocab_fingerprint(self) -> str:
        """sha256 over tokenizer model, pre-tokenizer and every token (length-prefixed)."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list):
            raise GGUFError(f"{self.path}: no tokenizer.ggml.tokens; is it a model file?")
        digest = hashlib.sha256()
        for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
            raw = self.metadata.get(key)
            value = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""
            digest.update(len(value).to_bytes(8, "little") + value)
        digest.update(len(tokens).to_bytes(8, "little"))
        for token in tokens:
            digest.update(len(token).to_bytes(8, "little") + token)
        return digest.hexdigest()

    def kv_cache_bytes(self, n_ctx: int, bytes_per_value: int = 2) -> int:
        """K and V for ``n_ctx`` positions at f16 (llama.cpp's default cache type)."""
        n_layer = int(self.arch_value("block_count", 0))
        n_embd = int(self.arch_value("embedding_length", 0))
        n_head = int(self.arch_value("attention.head_count", 1) or 1)
        n_head_kv = int(self.arch_value("attention.head_count_kv", n_head) or n_head)
        head_k = int(self.arch_value("attention.key_length", n_embd // n_head))
        head_v = int(self.arch_value("attention.value_length", n_embd // n_head))
        return n_layer * n_ctx * n_head_kv * (head_k + head_v) * bytes_per_value

    @property
    def family(self) -> str:
        """What a draft must share with its target besides the tokens: arch and tokenizer."""
        return f"{self.architecture}/{self.tokenizer_model or '?'}/{self.tokenizer_pre or '-'}"


class _Cursor:
    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> Any:
        end = self.pos + n
        if end > len(self.buf):
            raise GGUFError(f"{self.path}: truncated metadata (the file ends at byte "
                            f"{len(self.buf)}); re-download or re-convert it")
        view = self.buf[self.pos:end]
        self.pos = end
        return view

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        return bytes(self.take(self.unpack("<Q")))

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STR:
            return self.string().decode("utf-8", "surrogateescape")
        if vtype == _ARR:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type == _STR:
                if key in _KEEP_ARRAYS:
                    return [self.string() for _ in range(count)]
                for _ in range(count):
                    self.take(self.unpack("<Q"))
                return count
            if item_type in _SCALARS:
                self.take(struct.calcsize(_SCALARS[item_type]) * count)
                return count
            raise GGUFError(f"{self.path}: nested array in {key}")
        raise GGUFError(f"{self.path}: unknown value type {vtype} for {key}")


def read_info(path: PathArg) -> GGUFInfo:
    """Header and metadata of the GGUF at ``path``; :class:`GGUFError` when it is not one."""
    path = Path(path)
    try:
        size = path.stat().st_size
        fh = open(path, "rb")  # noqa: SIM115 - closed by the with block below
    except OSError as exc:
        raise GGUFError(f"{path}: {exc.strerror}") from None
    with fh:
        if size < 24:
            raise GGUFError(f"{path}: {size} bytes, too small to be a GGUF model")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            cur = _Cursor(memoryview(mapped), path)
            try:
                magic = bytes(cur.take(4))
                if magic != MAGIC:
                    raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected "
                                    f"{MAGIC!r})")
                version = cur.unpack("<I")
                if version not in SUPPORTED_VERSIONS:
                    raise GGUFError(f"{path}: GGUF version {version}, llama.cpp reads "
                                    f"{'/'.join(map(str, SUPPORTED_VERSIONS))}")
                n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
                metadata: dict[str, Any] = {}
                for _ in range(n_kv):
                    key = cur.string().decode("utf-8", "replace")
                    metadata[key] = cur.value(cur.unpack("<I"), key)
            finally:
                cur.buf.release()
    return GGUFInfo(path, size, version, n_tensors, metadata)


def vocab_fingerprint(path: PathArg) -> str:
    """The tokenizer identity of a GGUF (see :meth:`GGUFInfo.vocab_fingerprint`)."""
    return read_info(path).vocab_fingerprint()
