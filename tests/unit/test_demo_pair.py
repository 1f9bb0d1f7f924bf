"""The demo pair's storage (:class:`tightwad.pool.demomodels.Encoding`): a draft whose output
matrix is quantized shares every other weight with its target, bit for bit, and the files are
cached by spec and encoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from tightwad.pool import demomodels as m
from tightwad.pool.demomodels import Encoding, ModelSpec

# A small vocabulary (bert-bge, 30k) keeps writing and reading fast; the encoding does not care.
TINY = ModelSpec(name="tightwad-encoding-test", vocab="bert-bge", n_layer=3, n_embd=64,
                 n_head=2, n_head_kv=2, n_ff=128, seed=5, output_scale=16.0)


def _tensors(path: Path) -> dict[str, tuple[GGMLQuantizationType, np.ndarray]]:
    return {t.name: (t.tensor_type, np.asarray(t.data)) for t in m.read_gguf(path).tensors}


def test_a_quantized_output_draft_shares_the_rest_with_its_target(tmp_path: Path,
                                                                  vocab_dir: Path) -> None:
    target = m.cached_encoded(TINY, Encoding("f16"), tmp_path, vocab_dir)
    draft = m.cached_encoded(TINY.truncated(1), Encoding("f16", output="q4_0"), tmp_path,
                             vocab_dir)
    t, d = _tensors(target), _tensors(draft)
    assert t["output.weight"][0] == GGMLQuantizationType.F16
    assert d["output.weight"][0] == GGMLQuantizationType.Q4_0
    # q4_0: 18 bytes per 32 weights, a quarter of f32 plus the scales.
    assert d["output.weight"][1].nbytes * 32 == t["output.weight"][1].size * 18
    assert t["blk.0.ffn_up.weight"][0] == GGMLQuantizationType.F16
    assert set(d) == {n for n in t if not n.startswith(("blk.1.", "blk.2."))}
    for name in d:
        if name != "output.weight":
            assert np.array_equal(t[name][1], d[name][1]), name
    # Norms stay f32; the file name carries the encoding, and a second call reuses the file.
    assert t["blk.0.attn_norm.weight"][0] == GGMLQuantizationType.F32
    assert "f16-q4_0" in draft.name and "f16-big" in target.name
    mtime = draft.stat().st_mtime_ns
    assert m.cached_encoded(TINY.truncated(1), Encoding("f16", output="q4_0"), tmp_path,
                            vocab_dir) == draft
    assert draft.stat().st_mtime_ns == mtime


def test_the_demo_pair_is_a_truncated_target_with_a_cheaper_output() -> None:
    (target, t_enc), (draft, d_enc) = m.DEMO_TARGET, m.DEMO_DRAFT
    assert draft == target.truncated(2, name=draft.name)
    assert target.n_core_layers == 2 and 0 < target.deep_layer_scale < 1
    assert t_enc.matrices == d_enc.matrices  # the shared layers are the same bytes
    assert d_enc.output in ("q8_0", "q4_0") and t_enc.output is None
    assert target.vocab == "llama-bpe"  # a real 128k tokenizer
