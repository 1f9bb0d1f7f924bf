"""The verify patch (proxy/tightwad/patches/llama.cpp/0001-server-verify-prompt-logprobs.patch,
docs/verify-api.md).

A verify round sends context + k draft tokens to the pooled target with ``prompt_logprobs: k``
and ``n_predict: 1``; the server evaluates at most k + 1 new tokens in one batch and returns the
target's distribution at every draft position plus the token after the draft. These tests hold
it to what the speculation loop relies on:

- per position, the argmax equals what sequential greedy decoding produced, and the
  log-probabilities equal the sequential ``n_probs`` log-probabilities within ``TOL``;
- the server's own timings show one prompt evaluation of at most k + 1 tokens;
- a rejected tail is dropped from the slot's cache and the shared prefix is reused;
- concurrent verifies on different slots, and prompts longer than one batch, stay correct;
- requests without ``prompt_logprobs`` are untouched, and bad values are refused with 400.

Numerics: a batched forward pass uses other kernels and accumulation orders than one-token
decoding, so the two differ by float noise: a few 1e-3 near the top of the distribution (~2e-3
in docs/architecture.md, verify numerics), up to 1.4e-2 far down this suite's peaked target,
where larger logits carry larger rounding error. ``close`` allows ``TOL + RTOL * |logprob|``;
a logic error (wrong position, stale KV, another slot's logits) is off by units. Where the
argmax of a verified position differs from the sequential token, the test accepts it only as a near-tie (the
sequential token's verified log-probability within ``TOL`` of the top one) and counts it;
anything else is a bug.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from support import tokenize
from tightwad.pool.procs import LlamaServer, ProcessGroup

# Tolerance on natural-log probabilities between a batched verify and sequential decoding:
# |a - b| <= TOL + RTOL * |a|. Rounding error grows with the logits' magnitude, so far-down
# entries of a peaked distribution (logprob -6 and below) get proportionally more room.
TOL = 1e-2
RTOL = 2e-3


def close(got: float, want: float) -> bool:
    return abs(got - want) <= TOL + RTOL * max(abs(got), abs(want))
N_PROBS = 5
VERIFY_MAX = 32

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "東京の天気は",  # multibyte text through the real tokenizer
]
LONG_PROMPT = (
    "Tightwad pools mismatched machines into one endpoint. A small draft model proposes a few "
    "tokens, and the pooled target checks all of them in a single forward pass, so a slow "
    "link is paid once per round instead of once per token."
)


# ---------------------------------------------------------------------------------------------
# Helpers


@dataclass
class Reference:
    """Sequential greedy decoding of a prompt: the tokens and their ``n_probs`` entries.

    ``probs[i]`` is None where stock llama-server reports no entry: it leaves out a generated
    token whose text ends inside a UTF-8 character (byte tokens of CJK text, for instance).
    """

    prompt: list[int]
    tokens: list[int]
    probs: list[dict | None]


@dataclass
class Tally:
    positions: int = 0  # positions whose argmax was checked
    compared: int = 0  # ... and whose probabilities were compared with a sequential entry
    near_ties: int = 0
    max_diff: float = 0.0


def start_pool(procs: ProcessGroup, models, *, slots: int = 2, args: tuple[str, ...] = ()) -> LlamaServer:
    workers = [procs.rpc_worker(name=f"worker{i}") for i in range(2)]
    return procs.llama_server(models.target, name="coordinator", rpc=workers, slots=slots,
                              args=("--verify-max-tokens", str(VERIFY_MAX), *args))


def completion(server: LlamaServer, prompt: list[int], *, slot: int, n_predict: int, **extra) -> dict:
    return server.post("/completion", {
        "prompt": prompt, "n_predict": n_predict, "temperature": 0, "n_probs": N_PROBS,
        "cache_prompt": True, "id_slot": slot, "return_tokens": True, **extra,
    })


def reference(server: LlamaServer, prompt: list[int], n: int, *, slot: int = 0) -> Reference:
    res = completion(server, prompt, slot=slot, n_predict=n, ignore_eos=True)
    tokens, entries = res["tokens"], res["completion_probabilities"]
    assert len(tokens) == n
    probs: list[dict | None] = []
    used = 0
    for token in tokens:
        if used < len(entries) and entries[used]["id"] == token:
            probs.append(entries[used])
            used += 1
        else:
            probs.append(None)
    assert used == len(entries), "could not align the n_probs entries with the tokens"
    return Reference(prompt, tokens, probs)


def verify(server: LlamaServer, context: list[int], draft: list[int], *, slot: int,
           k: int | None = None) -> dict:
    k = len(draft) if k is None else k
    res = completion(server, context + draft, slot=slot, n_predict=1, prompt_logprobs=k)
    assert len(res["prompt_probabilities"]) == k
    return res


def same_top(got: list[dict], want: list[dict], tally: Tally) -> None:
    """Two top-N lists of one position agree, up to swaps at the edge of the list."""
    top_got = {t["id"]: t["logprob"] for t in got}
    top_want = {t["id"]: t["logprob"] for t in want}
    assert len(top_got) == len(top_want) == N_PROBS
    floor = min(top_got.values())
    for tok, logprob in top_want.items():
        if tok in top_got:
            diff = abs(top_got[tok] - logprob)
            tally.max_diff = max(tally.max_diff, diff)
            assert close(top_got[tok], logprob), \
                f"top logprob of {tok}: verify {top_got[tok]} vs sequential {logprob}"
        else:
            assert logprob <= floor or close(floor, logprob), \
                f"token {tok} ({logprob}) missing from the verified top-{N_PROBS}"


def argmax_is(top: list[dict], token: int, tally: Tally) -> None:
    """The verified argmax is ``token``, or ``token`` is within TOL of it (a counted near-tie)."""
    if top[0]["id"] == token:
        return
    logprob = next((t["logprob"] for t in top if t["id"] == token), None)
    assert logprob is not None, f"sequential token {token} not in the verified top-{N_PROBS}"
    gap = top[0]["logprob"] - logprob
    assert gap <= TOL, f"argmax {top[0]['id']} != sequential token {token}, top-2 gap {gap:.3g} > {TOL}"
    tally.near_ties += 1


def same_distribution(got: dict, want: dict | None, token: int, tally: Tally) -> None:
    """``got`` (verified) and ``want`` (sequential, if known) are entries for ``token`` at one position."""
    assert got["id"] == token
    tally.positions += 1
    argmax_is(got["top_logprobs"], token, tally)
    if want is None:
        return
    assert want["id"] == token
    diff = abs(got["logprob"] - want["logprob"])
    tally.compared += 1
    tally.max_diff = max(tally.max_diff, diff)
    assert close(got["logprob"], want["logprob"]), \
        f"logprob of token {token}: verify {got['logprob']} vs sequential {want['logprob']}"
    same_top(got["top_logprobs"], want["top_logprobs"], tally)


def check_verify(res: dict, ref: Reference, start: int, k: int, tally: Tally) -> None:
    """``res`` verified ref.tokens[start:start + k] after prompt + ref.tokens[:start]."""
    for j, entry in enumerate(res["prompt_probabilities"]):
        same_distribution(entry, ref.probs[start + j], ref.tokens[start + j], tally)
    after_draft(res, ref, start + k, tally)


def after_draft(res: dict, ref: Reference, i: int, tally: Tally) -> None:
    """The generated token after the draft (the bonus token when all k are accepted) is ref.tokens[i]."""
    assert res["tokens"] == [ref.tokens[i]]
    # Stock leaves out the entry of a token that ends inside a UTF-8 character.
    if res["completion_probabilities"]:
        (entry,) = res["completion_probabilities"]
        same_distribution(entry, ref.probs[i], ref.tokens[i], tally)


def report(record_property, tally: Tally) -> None:
    for name, value in vars(tally).items():
        record_property(name, value)
    print(f"\nverified {tally.positions} positions ({tally.compared} against sequential n_probs), "
          f"near-ties {tally.near_ties}, max |logprob diff| {tally.max_diff:.2e} (TOL {TOL}, RTOL {RTOL})")


# ---------------------------------------------------------------------------------------------
# Tests


def test_verify_matches_sequential_decoding_through_the_pool(procs, models, record_property) -> None:
    server = start_pool(procs, models)
    tally = Tally()
    for prompt_text in PROMPTS:
        prompt = tokenize(server, prompt_text)
        ref = reference(server, prompt, 17)
        for k in (1, 4, 16):
            res = verify(server, prompt, ref.tokens[:k], slot=0)
            check_verify(res, ref, 0, k, tally)

            timings = res["timings"]
            assert timings["prompt_n"] == k + 1, timings  # the context is cached up to its last token
            assert timings["cache_n"] == len(prompt) - 1, timings
            assert timings["predicted_n"] == 1, timings
            assert res["tokens_evaluated"] == len(prompt) + k
    assert tally.near_ties <= tally.positions // 10, "too many near-ties for a peaked test model"
    report(record_property, tally)


def test_verify_without_a_cache_evaluates_the_whole_prompt(procs, models) -> None:
    server = start_pool(procs, models)
    prompt = tokenize(server, PROMPTS[0])
    ref = reference(server, prompt, 5, slot=1)
    res = completion(server, prompt + ref.tokens[:4], slot=0, n_predict=1, prompt_logprobs=4,
                     cache_prompt=False)
    check_verify(res, ref, 0, 4, Tally())
    assert res["timings"]["cache_n"] == 0
    assert res["timings"]["prompt_n"] == len(prompt) + 4


def test_rejected_tail_is_dropped_and_the_prefix_reused(procs, models, record_property) -> None:
    server = start_pool(procs, models)
    prompt = tokenize(server, PROMPTS[1])
    ref = reference(server, prompt, 24, slot=1)  # slot 1: the verifying slot 0 starts cold
    tally = Tally()

    # Round 1: three good draft tokens, then five wrong ones.
    wrong = [t + 1 for t in ref.tokens[3:8]]
    res = verify(server, prompt, ref.tokens[:3] + wrong, slot=0)
    entries = res["prompt_probabilities"]
    for j in range(3):
        same_distribution(entries[j], ref.probs[j], ref.tokens[j], tally)
    # The first wrong token: the target's distribution there is the sequential one, so it
    # rejects the token and names the correction.
    assert entries[3]["id"] == wrong[0]
    same_top(entries[3]["top_logprobs"], ref.probs[3]["top_logprobs"], tally)
    argmax_is(entries[3]["top_logprobs"], ref.tokens[3], tally)

    # Round 2: context + accepted + correction + a new draft, on the same slot.
    accepted = ref.tokens[:4]
    draft = ref.tokens[4:12]
    res = verify(server, prompt + accepted, draft, slot=0)
    check_verify(res, ref, 4, len(draft), tally)
    timings = res["timings"]
    # The slot held prompt + 3 good + 5 wrong: exactly the shared prefix is reused.
    assert timings["cache_n"] == len(prompt) + 3, timings
    assert timings["prompt_n"] == len(draft) + 1, timings
    assert timings["predicted_n"] == 1

    # Round 3: everything accepted; asking for fewer positions than the new suffix still
    # re-evaluates the suffix (the cache cannot serve it) and returns only what was asked.
    res = verify(server, prompt + ref.tokens[:13], ref.tokens[13:20], slot=0, k=3)
    for j, entry in enumerate(res["prompt_probabilities"]):
        same_distribution(entry, ref.probs[17 + j], ref.tokens[17 + j], tally)
    after_draft(res, ref, 20, tally)
    assert res["timings"]["cache_n"] == len(prompt) + 12  # round 2 left prompt + tokens[:12]
    assert res["timings"]["prompt_n"] == 8
    report(record_property, tally)


def test_concurrent_verifies_on_different_slots(procs, models) -> None:
    server = start_pool(procs, models, slots=4)
    refs = [reference(server, tokenize(server, text), 13, slot=i) for i, text in enumerate(PROMPTS)]
    assert len({tuple(r.tokens) for r in refs}) == len(refs), "prompts must continue differently"

    for round_ in range(3):
        k = (4, 8, 12)[round_]
        results: list[dict | BaseException | None] = [None] * len(refs)

        def run(i: int, k: int = k, round_: int = round_,
                results: list[dict | BaseException | None] = results) -> None:
            try:
                # The other slot's reference makes every slot's cache differ from its prompt.
                results[i] = verify(server, refs[i].prompt, refs[i].tokens[:k],
                                    slot=(i + round_) % 4)
            except BaseException as exc:  # re-raised below
                results[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(refs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for ref, res in zip(refs, results):
            if isinstance(res, BaseException):
                raise res
            assert res is not None, "a verify request did not finish"
            check_verify(res, ref, 0, k, Tally())


def test_prompt_longer_than_one_batch(procs, models, record_property) -> None:
    server = start_pool(procs, models, args=("-b", "16", "-ub", "16"))
    prompt = tokenize(server, LONG_PROMPT)
    assert len(prompt) >= 30
    ref = reference(server, prompt, 25, slot=1)
    tally = Tally()

    # Cold slot: the whole prompt goes through in 16-token batches; the 20 verified positions
    # span two batch boundaries.
    k = 20
    res = verify(server, prompt, ref.tokens[:k], slot=0)
    check_verify(res, ref, 0, k, tally)
    assert res["timings"]["cache_n"] == 0
    assert res["timings"]["prompt_n"] == len(prompt) + k

    # Warm slot, 24 draft tokens: k + 1 = 25 new tokens > one batch.
    k = 24
    res = verify(server, prompt, ref.tokens[:k], slot=0)
    check_verify(res, ref, 0, k, tally)
    assert res["timings"]["cache_n"] == len(prompt) - 1
    assert res["timings"]["prompt_n"] == k + 1
    report(record_property, tally)


def test_requests_without_prompt_logprobs_are_unchanged(procs, models) -> None:
    # The feature off (the default) against the feature on: same request, same answer.
    plain = procs.llama_server(models.target, name="plain",
                               rpc=[procs.rpc_worker(name=f"plain-worker{i}") for i in range(2)])
    patched = start_pool(procs, models)
    prompt = tokenize(plain, PROMPTS[2])
    body = {"prompt": prompt, "n_predict": 12, "temperature": 0, "n_probs": N_PROBS,
            "cache_prompt": False, "return_tokens": True}
    want, got = plain.post("/completion", body), patched.post("/completion", body)

    assert "prompt_probabilities" not in want and "prompt_probabilities" not in got
    assert "prompt_logprobs" not in got["generation_settings"]
    assert got.keys() == want.keys()
    assert got["generation_settings"].keys() == want["generation_settings"].keys()
    assert got["tokens"] == want["tokens"] and got["content"] == want["content"]
    assert got["completion_probabilities"] == want["completion_probabilities"]


def test_bad_values_are_refused_with_400(procs, models) -> None:
    server = start_pool(procs, models)
    prompt = tokenize(server, PROMPTS[0])
    base = {"prompt": prompt, "n_predict": 1, "n_probs": 1}
    cases = {
        "as many as the prompt tokens": {"prompt_logprobs": len(prompt)},
        "above --verify-max-tokens": {"prompt": prompt * 20, "prompt_logprobs": VERIFY_MAX + 1},
        "negative": {"prompt_logprobs": -1},
        "not a number": {"prompt_logprobs": "four"},
        "several completions": {"prompt_logprobs": 1, "n": 2},
    }
    for why, extra in cases.items():
        status, body = server.post_raw("/completion", {**base, **extra})
        assert status == 400, (why, status, body)
        assert body["error"]["code"] == 400 and body["error"]["type"] == "invalid_request_error", why
        assert body["error"]["message"], why

    status, body = server.post_raw("/v1/completions", {"prompt": prompt, "max_tokens": 1,
                                                       "prompt_logprobs": 1})
    assert status == 400 and body["error"]["code"] == 400

    # The largest allowed value works, and the server is still serving.
    res = server.post("/completion", {**base, "prompt": prompt * 10, "prompt_logprobs": VERIFY_MAX})
    assert len(res["prompt_probabilities"]) == VERIFY_MAX
    assert server.healthy()


def test_disabled_without_the_server_flag(procs, models) -> None:
    workers = [procs.rpc_worker(name=f"worker{i}") for i in range(2)]
    server = procs.llama_server(models.target, rpc=workers)
    prompt = tokenize(server, PROMPTS[0])
    status, body = server.post_raw("/completion", {"prompt": prompt, "n_predict": 1, "prompt_logprobs": 1})
    assert status == 400 and "--verify-max-tokens" in body["error"]["message"]
    # prompt_logprobs: 0 is the stock request.
    res = server.post("/completion", {"prompt": prompt, "n_predict": 1, "prompt_logprobs": 0})
    assert "prompt_probabilities" not in res


def test_streaming_final_chunk_carries_prompt_probabilities(procs, models) -> None:
    server = start_pool(procs, models)
    prompt = tokenize(server, PROMPTS[3])
    ref = reference(server, prompt, 5, slot=1)
    status, text = server.post_raw("/completion", {
        "prompt": prompt + ref.tokens[:4], "n_predict": 1, "temperature": 0, "n_probs": N_PROBS,
        "prompt_logprobs": 4, "stream": True, "id_slot": 0,
    })
    assert status == 200 and isinstance(text, str)
    chunks = [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: {")]
    final = chunks[-1]
    assert final["stop"] is True
    tally = Tally()
    for j, entry in enumerate(final["prompt_probabilities"]):
        same_distribution(entry, ref.probs[j], ref.tokens[j], tally)
    assert all("prompt_probabilities" not in c for c in chunks[:-1])
