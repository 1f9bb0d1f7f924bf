"""What the proxy must know about the models' tokenizers: end-of-generation ids, and whether the
drafter's tokenizer is the target's.

Speculation exchanges token ids between two servers, so the drafter's ids must mean what the
target's mean. :func:`check_tokenizers` compares what both servers say about their vocabulary
(size, type, BOS/EOS text), how they tokenize a probe text full of edge cases (special tokens,
CJK, emoji, code, whitespace) and how they detokenize ids spread over the whole vocabulary. Any
difference disables speculation; the report names it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from tightwad.llamaserver.client import LlamaClient
from tightwad.llamaserver.wire import Props

# Token texts llama.cpp treats as end of generation (src/llama-vocab.cpp at the pin, the list
# that fills special_eog_ids), plus the model's own EOS from /props. An id counts when the text
# is exactly one token in this vocabulary: that is llama.cpp's own rule (token_to_id match).
EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
)

PROBE_TEXT = (
    "Tightwad probe <|begin_of_text|><s>[INST] Hello, world!\n\tdef f(x):\n        return x**2 "
    "# ok\n東京の天気は晴れ。 Привет, мир! مرحبا 😀👍🏽 🇯🇵 café naïve 12345 3.14159 "
    "<|im_start|>user<|im_end|> <|eot_id|> <|endoftext|> </s> [/INST]   \r\n\n\n"
)


async def eog_ids(client: LlamaClient, props: Props) -> frozenset[int]:
    """Token ids that end generation for this server's model."""
    texts = dict.fromkeys([props.eos_token, *EOG_TEXTS])
    found: set[int] = set()
    for text in texts:
        if not text:
            continue
        pieces = await client.tokenize_pieces(text)
        if len(pieces) == 1 and pieces[0][1] == text:
            found.add(pieces[0][0])
    return frozenset(found)


def _sample_ids(n_vocab: int, count: int = 512) -> list[int]:
    """Ids spread over the vocabulary, plus its last 256 (where special tokens usually sit)."""
    step = max(1, n_vocab // count)
    ids = set(range(0, n_vocab, step)) | set(range(max(0, n_vocab - 256), n_vocab))
    return sorted(ids)


@dataclass(frozen=True)
class TokenizerCheck:
    """The outcome of comparing the drafter's tokenizer with the target's."""

    match: bool
    reason: str
    """One line: why they match, or the first difference found."""
    target_fingerprint: str = ""
    drafter_fingerprint: str = ""
    details: dict[str, object] = field(default_factory=dict)


async def _fingerprint(client: LlamaClient, props: Props,
                       ids: Sequence[int]) -> tuple[str, list[int], str]:
    probe = await client.tokenize(PROBE_TEXT, add_special=True, parse_special=True)
    text = await client.detokenize(ids) if ids else ""
    digest = hashlib.sha256(repr((props.n_vocab, props.vocab_type, props.bos_token,
                                  props.eos_token, probe, text)).encode()).hexdigest()[:16]
    return digest, probe, text


async def check_tokenizers(target: LlamaClient, target_props: Props, drafter: LlamaClient,
                           drafter_props: Props) -> TokenizerCheck:
    """Compare the two servers' tokenizers; raises :class:`~tightwad.llamaserver.client.UpstreamFailure`
    when either cannot be asked (the check is then still pending, not failed)."""

    def differ(what: str, t: object, d: object) -> TokenizerCheck:
        return TokenizerCheck(False, f"{what} differs: target {t!r}, drafter {d!r}",
                              details={"target_model": target_props.model,
                                       "drafter_model": drafter_props.model})

    for what, t, d in (("vocabulary size", target_props.n_vocab, drafter_props.n_vocab),
                       ("vocabulary type", target_props.vocab_type, drafter_props.vocab_type),
                       ("BOS token", target_props.bos_token, drafter_props.bos_token),
                       ("EOS token", target_props.eos_token, drafter_props.eos_token)):
        if t != d:
            return differ(what, t, d)
    ids = _sample_ids(int(target_props.n_vocab or 0))
    t_fp, t_probe, t_text = await _fingerprint(target, target_props, ids)
    d_fp, d_probe, d_text = await _fingerprint(drafter, drafter_props, ids)
    if t_probe != d_probe:
        first = next((i for i, (a, b) in enumerate(zip(t_probe, d_probe)) if a != b),
                     min(len(t_probe), len(d_probe)))
        return differ(f"tokenization of the probe text (token {first})",
                      t_probe[first:first + 3], d_probe[first:first + 3])
    if t_text != d_text:
        return differ(f"detokenization of {len(ids)} sampled ids", t_fp, d_fp)
    return TokenizerCheck(True, f"same tokenizer ({target_props.n_vocab} tokens; probe and "
                                f"{len(ids)} sampled ids agree)",
                          target_fingerprint=t_fp, drafter_fingerprint=d_fp,
                          details={"target_model": target_props.model,
                                   "drafter_model": drafter_props.model})
