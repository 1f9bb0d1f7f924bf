"""The GGUF factory for test models: determinism, truncated drafts, tokenizer copies, cache.

Pure file-level tests (no llama.cpp processes). Most use a tiny model on the phi-3 vocab
(32k tokens, with scores, bools and a chat template) to stay fast: gguf's reader needs
seconds per 128k-token vocabulary, so the standard set is written and read once.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from tightwad.pool import demomodels as m
from tightwad.pool.demomodels import (
    DRAFT_SPEC,
    TARGET_SPEC,
    ModelSpec,
    cached_model,
    read_gguf,
    vocab_fingerprint,
    write_model,
)
from tightwad_dev.models import FOREIGN_SPEC, ensure_models

SMALL = ModelSpec(
    name="tightwad-unit",
    vocab="phi-3",
    n_layer=3,
    n_embd=16,
    n_head=2,
    n_head_kv=1,
    n_ff=32,
    seed=7,
    output_scale=3.0,
    deep_layer_scale=0.25,
    n_core_layers=1,
)


@functools.cache
def _reader(path: Path) -> GGUFReader:
    # Parsing a 128k-token vocabulary takes seconds: read each file once per session.
    return read_gguf(path)


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data) for t in _reader(path).tensors}


def _value(path: Path, key: str):
    return _reader(path).fields[key].contents()


def _raw_field(reader: GGUFReader, key: str) -> tuple[list[GGUFValueType], list[bytes]]:
    field = reader.fields[key]
    return list(field.types), [bytes(part) for part in field.parts]


def _tokenizer_keys(reader: GGUFReader) -> list[str]:
    return [key for key in reader.fields if key.startswith("tokenizer.")]


def _assert_tokenizer_copied(model: Path, vocab_file: Path) -> None:
    model_reader, vocab_reader = _reader(model), _reader(vocab_file)
    assert _tokenizer_keys(model_reader) == _tokenizer_keys(vocab_reader)
    for key in _tokenizer_keys(vocab_reader):
        # Same types and the same encoded bytes (key, type tags, lengths, values).
        assert _raw_field(model_reader, key) == _raw_field(vocab_reader, key), key


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, vocab_dir: Path) -> Path:
    return write_model(SMALL, tmp_path_factory.mktemp("small") / "small.gguf", vocab_dir)


@pytest.fixture(scope="module")
def standard(tmp_path_factory: pytest.TempPathFactory, vocab_dir: Path) -> m.ModelSet:
    return ensure_models(tmp_path_factory.mktemp("standard"), vocab_dir)


def test_same_spec_gives_the_same_bytes(small: Path, tmp_path: Path, vocab_dir: Path) -> None:
    again = write_model(SMALL, tmp_path / "again.gguf", vocab_dir)
    assert again.read_bytes() == small.read_bytes()


def test_another_seed_gives_other_weights(small: Path, tmp_path: Path, vocab_dir: Path) -> None:
    other = write_model(dataclasses.replace(SMALL, seed=8), tmp_path / "other.gguf", vocab_dir)
    ours, theirs = _tensors(small), _tensors(other)
    assert ours.keys() == theirs.keys()
    for name in ("token_embd.weight", "output.weight", "blk.0.attn_q.weight"):
        assert not np.array_equal(ours[name], theirs[name]), name


def test_hyperparameters_are_written(small: Path) -> None:
    expected = {
        "general.architecture": "llama",
        "general.name": "tightwad-unit",
        "general.file_type": 1,
        "llama.block_count": 3,
        "llama.context_length": SMALL.context_length,
        "llama.embedding_length": 16,
        "llama.feed_forward_length": 32,
        "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 1,
        "llama.rope.dimension_count": 8,
        "llama.vocab_size": len(_reader(small).fields["tokenizer.ggml.tokens"].data),
    }
    assert {key: _value(small, key) for key in expected} == expected
    assert _value(small, "llama.rope.freq_base") == pytest.approx(SMALL.rope_base)
    assert _value(small, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(SMALL.rms_eps)


def test_tensor_types_shapes_and_values(small: Path) -> None:
    n_vocab = _value(small, "llama.vocab_size")
    tensors = {t.name: t for t in _reader(small).tensors}
    assert len(tensors) == 3 + 9 * SMALL.n_layer
    # f16 for the two vocabulary-sized matrices, f32 for everything else (never f64).
    for name, tensor in tensors.items():
        big = name in ("token_embd.weight", "output.weight")
        expected = GGMLQuantizationType.F16 if big else GGMLQuantizationType.F32
        assert tensor.tensor_type == expected, name
        assert np.isfinite(np.asarray(tensor.data, dtype=np.float32)).all(), name
    assert tensors["token_embd.weight"].data.shape == (n_vocab, 16)
    assert tensors["blk.0.attn_k.weight"].data.shape == (8, 16)  # n_head_kv * head_dim rows
    assert tensors["blk.0.ffn_down.weight"].data.shape == (16, 32)
    assert np.array_equal(tensors["output_norm.weight"].data, np.ones(16, dtype=np.float32))
    # Logits have std ~ output_scale: the output rows are scaled by output_scale / sqrt(n_embd).
    output = np.asarray(tensors["output.weight"].data, dtype=np.float32)
    assert np.std(output) == pytest.approx(3.0 / 4.0, rel=0.02)


def test_f32_big_matrices(tmp_path: Path, vocab_dir: Path) -> None:
    spec = dataclasses.replace(SMALL, big_dtype="f32")
    path = write_model(spec, tmp_path / "f32.gguf", vocab_dir)
    tensors = {t.name: t for t in _reader(path).tensors}
    assert tensors["token_embd.weight"].tensor_type == GGMLQuantizationType.F32
    assert _value(path, "general.file_type") == 0


def test_only_deep_layers_residual_outputs_are_scaled(
    small: Path, tmp_path: Path, vocab_dir: Path
) -> None:
    flat_spec = dataclasses.replace(SMALL, deep_layer_scale=1.0)
    flat = write_model(flat_spec, tmp_path / "flat.gguf", vocab_dir)
    scaled, unscaled = _tensors(small), _tensors(flat)
    for layer in range(SMALL.n_layer):
        deep = layer >= SMALL.n_core_layers
        for kind in ("attn_output", "ffn_down"):
            name = f"blk.{layer}.{kind}.weight"
            gain = 0.25 if deep else 1.0
            assert np.allclose(scaled[name], unscaled[name] * gain, rtol=1e-6), name
        for kind in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"):
            name = f"blk.{layer}.{kind}.weight"
            assert np.array_equal(scaled[name], unscaled[name]), name


def test_truncated_draft_shares_the_targets_tensors(
    small: Path, tmp_path: Path, vocab_dir: Path
) -> None:
    draft = write_model(SMALL.truncated(1), tmp_path / "draft.gguf", vocab_dir)
    assert _value(draft, "llama.block_count") == 1
    assert _value(draft, "general.name") == "tightwad-unit-draft1"
    target_tensors, draft_tensors = _tensors(small), _tensors(draft)
    expected_names = {n for n in target_tensors if not n.startswith(("blk.1.", "blk.2."))}
    assert set(draft_tensors) == expected_names
    for name in expected_names:
        assert draft_tensors[name].tobytes() == target_tensors[name].tobytes(), name
    assert vocab_fingerprint(_reader(draft)) == vocab_fingerprint(_reader(small))


def test_tokenizer_is_copied_exactly(small: Path, vocab_dir: Path) -> None:
    vocab_file = vocab_dir / "ggml-vocab-phi-3.gguf"
    _assert_tokenizer_copied(small, vocab_file)
    assert _value(small, "tokenizer.chat_template") == _value(vocab_file, "tokenizer.chat_template")
    assert _value(small, "tokenizer.ggml.add_bos_token") is True


def test_fingerprint_is_the_vocab_files_and_tells_tokenizers_apart(
    small: Path, vocab_dir: Path
) -> None:
    phi3 = _reader(vocab_dir / "ggml-vocab-phi-3.gguf")
    llama_spm = _reader(vocab_dir / "ggml-vocab-llama-spm.gguf")
    # A path and an open reader give the same fingerprint; a model's is its vocab file's.
    assert vocab_fingerprint(small) == vocab_fingerprint(phi3)
    # llama-spm has nearly the same 32k-token SentencePiece vocabulary as phi-3, yet differs.
    assert vocab_fingerprint(small) != vocab_fingerprint(llama_spm)


def _vocab_file(path: Path, tokens: list[str] | None, model: str = "gpt2", **extra: int) -> Path:
    writer = GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre("default")
    if tokens is not None:
        writer.add_token_list(tokens)
    for key, value in extra.items():
        writer.add_uint32(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def test_fingerprint_covers_tokens_boundaries_and_model(tmp_path: Path) -> None:
    def fingerprint(tokens: list[str], model: str = "gpt2", **extra: int) -> str:
        path = tmp_path / f"v{len(list(tmp_path.iterdir()))}.gguf"
        return vocab_fingerprint(_vocab_file(path, tokens, model, **extra))

    base = fingerprint(["a", "b", "c"])
    # Keys that do not change the token ids leave it alone.
    assert fingerprint(["a", "b", "c"], **{"tokenizer.ggml.bos_token_id": 2}) == base
    assert fingerprint(["a", "b", "d"]) != base
    assert fingerprint(["a", "c", "b"]) != base
    assert fingerprint(["ab", "c", ""]) != fingerprint(["a", "bc", ""])
    assert fingerprint(["a", "b", "c"], model="llama") != base


def test_fingerprint_refuses_a_file_without_tokenizer(tmp_path: Path) -> None:
    bare = _vocab_file(tmp_path / "bare.gguf", tokens=None)
    with pytest.raises(ValueError, match="no tokenizer.ggml.tokens"):
        vocab_fingerprint(bare)


def test_write_is_atomic(
    small: Path, tmp_path: Path, vocab_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "model.gguf"
    dest.write_bytes(b"previous model")

    def crash(spec: ModelSpec, out: Path, *rest: object) -> None:
        out.write_bytes(b"GGUF half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(m, "_write_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        write_model(SMALL, dest, vocab_dir)
    assert dest.read_bytes() == b"previous model"
    assert os.listdir(tmp_path) == ["model.gguf"]

    monkeypatch.undo()
    write_model(SMALL, dest, vocab_dir)
    assert dest.read_bytes() == small.read_bytes()
    assert os.listdir(tmp_path) == ["model.gguf"]
    assert dest.stat().st_mode & 0o777 == 0o644


def test_cached_model_writes_once_per_spec(
    tmp_path: Path, vocab_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = cached_model(SMALL, tmp_path, vocab_dir)
    assert first.name.startswith("tightwad-unit-") and first.suffix == ".gguf"

    def must_not_write(*args: object) -> Path:
        raise AssertionError("an unchanged spec was written again")

    monkeypatch.setattr(m, "write_model", must_not_write)
    assert cached_model(SMALL, tmp_path, vocab_dir) == first
    monkeypatch.undo()

    changed = cached_model(dataclasses.replace(SMALL, output_scale=2.0), tmp_path, vocab_dir)
    assert changed != first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, changed.name])


@pytest.mark.parametrize(
    "changes",
    [
        {"n_embd": 15},  # not a multiple of n_head
        {"n_head_kv": 3},  # n_head not a multiple of n_head_kv
        {"n_embd": 6, "n_head": 2},  # odd head size: no RoPE pairs
        {"keep_layers": 0},
        {"keep_layers": 4},
        {"n_core_layers": 4},
        {"big_dtype": "q8_0"},
        {"vocab": "../etc"},
        {"name": "a/b"},
        {"name": ".hidden"},
    ],
)
def test_invalid_specs_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="invalid ModelSpec"):
        dataclasses.replace(SMALL, **changes)


def test_missing_vocab_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ggml-vocab-phi-3.gguf"):
        write_model(SMALL, tmp_path / "x.gguf", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_standard_specs_fit_together() -> None:
    assert TARGET_SPEC.truncated(2, name=DRAFT_SPEC.name) == DRAFT_SPEC
    assert DRAFT_SPEC.name != TARGET_SPEC.name
    assert TARGET_SPEC.n_core_layers == DRAFT_SPEC.n_written_layers
    assert 0 < TARGET_SPEC.deep_layer_scale < 1
    assert FOREIGN_SPEC.vocab != TARGET_SPEC.vocab


def test_ensure_models_is_cached(standard: m.ModelSet, vocab_dir: Path) -> None:
    paths = (standard.target, standard.draft, standard.foreign)
    assert len({p.name for p in paths}) == 3
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]
    again = ensure_models(standard.target.parent, vocab_dir)
    assert again == standard
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths] == before
    assert sorted(os.listdir(standard.target.parent)) == sorted(p.name for p in paths)


def test_standard_set_tokenizers(standard: m.ModelSet) -> None:
    # Copying itself is checked byte for byte on phi-3 above; here: the set's identities.
    target, draft, foreign = map(_reader, (standard.target, standard.draft, standard.foreign))
    assert _value(standard.target, "llama.block_count") == TARGET_SPEC.n_layer
    assert _value(standard.draft, "llama.block_count") == DRAFT_SPEC.keep_layers
    assert vocab_fingerprint(draft) == vocab_fingerprint(target)
    assert vocab_fingerprint(foreign) != vocab_fingerprint(target)
    # The qwen2 vocabulary, chat template included, on a llama-architecture model.
    assert _value(standard.foreign, "general.architecture") == "llama"
    assert _value(standard.foreign, "llama.vocab_size") == 151936
    assert "<|im_start|>" in _value(standard.foreign, "tokenizer.chat_template")
    assert "tokenizer.chat_template" not in target.fields
