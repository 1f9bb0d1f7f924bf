"""Each configuration's greedy output against (a)'s, the target alone on one server."""

from __future__ import annotations

from typing import Any

from tightwad.pool.procs import LlamaServer

from .measure import Bench
from .settings import VERIFY_MAX_TOKENS


def token_text(server: LlamaServer, prompt: list[int], tokens: list[int]) -> str:
    """The text of ``tokens`` after ``prompt`` as a client of the proxy receives it: their raw
    bytes (read from the verify API's per-position entries) decoded as UTF-8 with replacement,
    exactly what the proxy's incremental decoder emits (llama-server's own stream instead
    drops an incomplete character at the end)."""
    raw = b""
    for start in range(0, len(tokens), VERIFY_MAX_TOKENS):
        end = min(start + VERIFY_MAX_TOKENS, len(tokens))
        res = server.post("/completion", {
            "prompt": prompt + tokens[:end], "n_predict": 1, "temperature": 0, "n_probs": 1,
            "prompt_logprobs": end - start, "cache_prompt": False}, timeout=300)
        for entry, token in zip(res["prompt_probabilities"], tokens[start:end]):
            if entry["id"] != token:
                raise RuntimeError(f"verify entry {entry['id']} for token {token}")
            raw += bytes(entry["bytes"])
    return raw.decode("utf-8", errors="replace")


def compare_outputs(bench: Bench, single: LlamaServer) -> dict[str, dict[str, Any]]:
    """Each (config, k)'s greedy output per prompt against (a)'s: the streamed text of the same
    llama-server stream format (b, c, c2), or the text decoded from (a)'s tokens as the proxy
    emits it (d: a difference must sit at a near-tie of the target's top two tokens; e: its
    text must be a prefix of (a)'s or extend it)."""
    from tightwad_dev.inproc import greedy_text_verdict

    out: dict[str, dict[str, Any]] = {}
    texts: dict[int, str] = {}
    a_text = {s.prompt: s.text for s in bench.samples
              if s.config == "a" and s.streams == 1 and s.rep == 0}
    for s in bench.samples:
        if s.streams != 1 or s.config == "a" or s.rep != 0:
            continue
        ref = bench.reference[s.prompt]
        prompt = bench.prompts[s.prompt][1]
        key = f"{s.config}/{s.k}"
        entry = out.setdefault(key, {"same": 0, "near_tie": 0, "different": 0, "details": []})
        if s.config not in ("d", "e"):
            # Same server, same stream format: llama-server's streamed text (which leaves out
            # bytes of incomplete characters, and their tokens) must be (a)'s streamed text.
            verdict = "same" if s.text == a_text[s.prompt] else "different"
            entry[verdict] += 1
            continue
        if s.prompt not in texts:
            texts[s.prompt] = token_text(single, prompt, ref)
        expected = texts[s.prompt]
        if s.config == "e":
            mine = s.text.rstrip("\ufffd")
            same = expected.startswith(mine) or mine.startswith(expected.rstrip("\ufffd"))
            verdict = "same" if same else "different"
        elif s.text == expected:
            verdict = "same"
        else:
            try:
                verdict = greedy_text_verdict(single, prompt, s.text, {
                    "content": expected, "tokens": ref}).replace("-", "_")
            except AssertionError as exc:
                verdict = "different"
                entry["details"].append(str(exc)[:300])
        entry[verdict] += 1
    for key, entry in out.items():
        entry["verdict"] = verdict_text(key, entry)
    return out


def verdict_text(key: str, entry: dict[str, Any]) -> str:
    """One (config, k)'s verdict over its prompts, as the report quotes it."""
    n = entry["same"] + entry["near_tie"] + entry["different"]
    prefix = " (as a prefix)" if key.startswith("e/") else ""
    if entry["different"]:
        return f"{entry['different']}/{n} differ"
    if entry["near_tie"]:
        return f"same ({entry['near_tie']}/{n} at a near-tie)"
    return f"same{prefix} ({n}/{n})"
