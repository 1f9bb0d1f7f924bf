"""The test suite's model set: the demo pair plus a draft with another tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tightwad.pool.demomodels import ModelSpec, PathArg, cached_model, ensure_demo_pair

FOREIGN_SPEC = ModelSpec(
    name="tightwad-test-foreign",
    vocab="qwen2",
    n_layer=2,
    n_embd=64,
    n_head=2,
    n_head_kv=2,
    n_ff=128,
    seed=2,
    output_scale=16.0,
)


@dataclass(frozen=True)
class ModelSet:
    """The standard models of the test suite."""

    target: Path
    draft: Path  # same tokenizer: the target's first layers
    foreign: Path  # a different tokenizer (qwen2): must be refused as a draft


def ensure_models(dest_dir: PathArg, vocab_dir: PathArg) -> ModelSet:
    """The demo pair and the foreign-tokenizer draft, cached by spec."""
    pair = ensure_demo_pair(dest_dir, vocab_dir)
    return ModelSet(target=pair.target, draft=pair.draft,
                    foreign=cached_model(FOREIGN_SPEC, dest_dir, vocab_dir))
