"""The markdown report of a run (docs/benchmarks.md): pure text from the result, then
:func:`write_markdown` writes it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tightwad_dev import benchmath as bm

from .settings import FULL_RUN, LEGACY_VERSION
from .tables import (
    concurrency_table,
    config_table,
    cpu_table,
    fmt,
    fmt_bytes,
    profile_table,
    repeat_table,
    targets_table,
)


def write_markdown(result: dict[str, Any], path: Path, plot: Path | None) -> None:
    text = markdown(result, os.path.relpath(plot, path.parent) if plot else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def reduced_from(settings: dict[str, Any]) -> list[str]:
    """The settings in which a run falls short of the full run (empty: a full run)."""
    return [f"{key} {settings[key]} (full: {full})" for key, full in FULL_RUN.items()
            if settings.get(key) != full]


def full_command(result: dict[str, Any]) -> str:
    """The full run of this run's link and vocabulary, writing its JSON."""
    s = result["settings"]
    vocab = f" --vocab {s['vocab']}" if s.get("vocab", "byte-bpe") != "byte-bpe" else ""
    return (f".venv/bin/python bench/pool_bench.py --profile {s['profile']}{vocab} "
            f"--install-legacy --json {full_json(result)}")


def full_json(result: dict[str, Any]) -> str:
    s = result["settings"]
    real = s.get("vocab", "byte-bpe") != "byte-bpe"
    return f"bench/results/pool_bench-{s['profile']}{'-real-vocab' if real else ''}.json"


def markdown(result: dict[str, Any], plot_link: str | None) -> str:
    """The whole page; ``plot_link``: the plot's path relative to the page, if there is one.
    ``result["beside"]``, when set, is another run (the other vocabulary) shown in a section of
    its own."""
    lines = [*setup_lines(result), *body_lines(result, "##")]
    other = result.get("beside")
    if other:
        lines += ["", f"## Beside it: the {vocab_name(other)}", "",
                  f"Another run of the same script (its JSON: `{result.get('beside_path') or '-'}`"
                  "; `--render JSON --beside JSON` writes both sections again):", "",
                  "```bash", other["command"], "```", *reduced_note(other, "section"), "",
                  *setup_bullets(other), *body_lines(other, "###")]
    if result.get("repeats"):
        runs = [result, *result["repeats"]]
        lines += ["", "## Repeatability: the same benchmark run again", "",
                  f"Run 1 is the run above; the others are other runs of the same script "
                  f"(JSON: {', '.join(f'`{p}`' for p in result.get('repeat_paths', [])) or 'not kept'}).",
                  "", repeat_table(runs)]
    lines += ["", "## Greedy outputs", ""]
    for run in (result, *([other] if other else [])):
        eq = run["outputs"]
        lines += [f"{vocab_name(run).capitalize()}: each configuration's text for every prompt "
                  "compared with (a)'s: "
                  + "; ".join(f"{key}: {v['verdict']}" for key, v in sorted(eq.items())) + ".",
                  ""]
    if result.get("legacy_note"):
        lines += [result["legacy_note"], ""]
    if plot_link:
        lines += [f"![tok/s per configuration, the k sweep and concurrency]({plot_link})", ""]
    return "\n".join(lines)


def vocab_name(result: dict[str, Any]) -> str:
    n = result["models"]["n_vocab"]
    if result["settings"].get("vocab", "byte-bpe") == "byte-bpe":
        return f"small vocabulary ({n} tokens)"
    return f"real vocabulary (llama-bpe, {n} tokens)"


def body_lines(result: dict[str, Any], h: str) -> list[str]:
    """One run's sections, at heading level ``h``."""
    lines = [*pair_lines(result, h)]
    lines += ["", f"{h} Targets of issues 13 and 14, as measured", "",
              "Each line is a ratio or count from this run, held against the issue's target; "
              "nothing was tuned for them. Issue 14's targets are about a real vocabulary "
              "(`--vocab llama-bpe`); on the small vocabulary they are printed for comparison.",
              "", "Issue 13 (many streams):", "", targets_table(result["targets"]["13"]), "",
              "Issue 14 (real vocabularies):", "", targets_table(result["targets"]["14"]), ""]
    lines += [f"{h} Results, one stream", "", config_table(result), "",
              "tok/s = generated tokens / request time (time to first token included); ms/token "
              "is its inverse, in absolute terms; [95% CI] = bootstrap confidence interval of "
              "the median over prompts x repetitions. RPC round trips and bytes count all "
              "traffic between the coordinator and the rpc-servers; the draft link is the "
              "proxy's traffic to the drafter. Leviathan S = E(a, k) / (k c + 1) (a verify costs "
              "one step); component S = E(a, k) x (b)'s ms/token / (draft call + verify of k "
              "tokens, each as measured in the round profile below): what a round loop with no "
              "cost of its own reaches here. Efficiency = measured speed-up over (b) / S; both "
              "only for (c) and (d) at a profiled k ((c2) drafts over the network, which neither "
              "bound models). \"output = (a)\": the greedy text equals the single server's (for "
              "d, a difference at a near-tie of the target's top two tokens is reported as "
              "such, docs/architecture.md).", ""]
    lines += [f"{h} Concurrency", "", concurrency_table(result), "",
              "Aggregate tok/s = all tokens of a batch of simultaneous streams / the batch's "
              "wall time; ms/token its inverse; latency = each request's wall time (p99 by "
              "linear interpolation). The round profile under load (coordinator batches per "
              "second from llama-server's `llamacpp:n_decode_total`, generated tokens, RPC round "
              "trips and bytes per batch from the relays) comes from each batch's steady state: "
              "from the moment every stream has its first token to the moment the first one "
              "ends, after a warm-up batch of the same width (a warm graph). \"same as solo\": "
              "streams whose text equals the same configuration's one-stream text for their "
              "prompt.", ""]
    if cpu := cpu_table(result):
        lines += ["CPU time per generated token in the same steady state, ms, per process "
                  "(user + system from /proc; worker: every rpc-server of the pool; relay: the "
                  "link emulator; client: this load generator; steal: time the host gave this "
                  "machine's CPUs to others, a noisy neighbour):", "", cpu, ""]
    if result.get("profile"):
        lines += [f"{h} One round per k", "", profile_text(result), "", profile_table(result),
                  ""]
    lines += [f"{h} Headline", "", *headline_lines(result["headline"])]
    return lines


def reduced_note(result: dict[str, Any], what: str = "page") -> list[str]:
    reduced = reduced_from(result["settings"])
    if not reduced:
        return []
    lines = ["", f"**This {what} comes from a REDUCED run** ({'; '.join(reduced)}): every "
             "number in it is from that run, so its spreads are wide and its ratios indicative "
             "only. The full run:", "", "```bash", full_command(result)]
    if what == "page":
        other = result.get("beside")
        if other:
            lines.append(full_command(other))
        lines.append(".venv/bin/python bench/pool_bench.py --render " + full_json(result)
                     + (f" --beside {full_json(other)}" if other else "")
                     + " --plot docs/benchmarks.png --markdown docs/benchmarks.md")
    return [*lines, "```"]


def setup_lines(result: dict[str, Any]) -> list[str]:
    """The title, the command, the setup and the method."""
    return [
        "# Benchmarks: the pool over an emulated link, against the speculative-decoding bound",
        "",
        "Generated by `bench/pool_bench.py` from one run"
        + (" (and, in a section of its own, a second run with the other vocabulary)"
           if result.get("beside") else "")
        + "; every number below is its output "
        f"(its JSON: `{result.get('json_path') or '--json'}`; `--render JSON` writes this "
        "page and the plot again from it). Rerun the command to check them.",
        "",
        "```bash",
        result["command"],
        "```",
        *reduced_note(result),
        "",
        *setup_bullets(result),
    ]


def setup_bullets(result: dict[str, Any]) -> list[str]:
    s = result["settings"]
    m = result["machine"]
    models = result["models"]
    vocab = (f"byte-level BPE vocabulary of {models['n_vocab']} tokens, ChatML template"
             if s.get("vocab", "byte-bpe") == "byte-bpe" else
             f"Llama 3's llama-bpe tokenizer from the pinned tree ({models['n_vocab']} tokens)")
    return [
        f"- **Link**: {result['link']}, emulated by `tightwad.pool.linkemu` relays (in a process "
        f"of their own) between the coordinator and each of the {s['workers']} RPC workers, "
        "the junk host's rpc-server (c2) and the drafter (d, e)"
        + (", and in front of each worker's peer port: the workers pass hidden states to each "
           "other (patch 0007), not through the coordinator" if s.get("peers") else
           "; the workers pass hidden states through the coordinator (stock llama.cpp)")
        + "; the proxy and the coordinator share a host.",
        f"- **Machine**: {m['cpus']} CPU cores ({m['cpu_model']}), no GPU, {m['system']}; "
        f"every process (workers, coordinator, drafter, proxy, relays) on these cores with "
        f"{s['threads']} thread each. The machine was shared with other work (load average "
        f"{m['loadavg_start'][0]:.2f} at the start, {m['loadavg_end'][0]:.2f} at the end).",
        f"- **llama.cpp**: {result['llama_cpp']}; every llama-server runs with the pool's "
        "settings (`tightwad.defaults.LLAMA_SERVER_ARGS`"
        + (f": `{' '.join(result['pool_args'])}`" if "pool_args" in result
           else ", as the code of the run's day had them")
        + "), the coordinator also with the product's arguments "
        f"(`tightwad.pool.localpool.coordinator_args()`: "
        f"`{' '.join(result.get('coordinator_args', []))}`), the drafter with "
        f"`{' '.join(result.get('drafter_args', []))}`.",
        f"- **Models** (`tightwad_dev.benchmodels`, random weights, docs/architecture.md): target "
        f"{models['target']['n_layer']} layers x {models['target']['n_embd']} wide (ffn "
        f"{models['target']['n_ff']}), deeper layers scaled by "
        f"{models['target']['deep_layer_scale']}, {models['target']['mb']} MB f16; draft = its "
        f"first {models['draft']['n_layer']} layers + the same embeddings and output "
        f"({models['draft']['mb']} MB); {vocab}.",
        f"- **Workload**: {s['prompts']} prompts, {s['tokens']} generated tokens per request, "
        f"greedy (temperature 0, `ignore_eos`); {s['reps']} repetitions.",
        "- **Method**: the configurations are interleaved: each repetition visits every "
        "(configuration, k) once, in an order rotated (and reversed every other time) per "
        "repetition, and each visit starts its own coordinator (and proxy), warms it up (one "
        "short request per prompt), then times one request per prompt and, for (b), (c) at "
        "llama.cpp's default k and (d) adaptive, one batch per concurrency level "
        f"({', '.join(str(n) for n in s['concurrency'] if n > 1) or 'none'} streams) after a "
        "warm-up batch of the same width. The round profile runs last on a fresh coordinator, "
        "each k's shapes warmed first.",
        "",
    ]


def pair_lines(result: dict[str, Any], h: str = "##") -> list[str]:
    """Agreement and costs of the pair: what the bound is built from, and the two costs of a
    real vocabulary kept apart (the draft's own output matrix, the logits payload)."""
    bound = result["bound"]
    costs = result["costs"]
    n_vocab = result["models"]["n_vocab"]
    per_k = (result.get("profile") or {}).get("per_k", {})
    k_show = "8" if "8" in per_k else (max(per_k, key=int) if per_k else None)
    payload = ""
    if k_show:
        p = per_k[k_show]
        between = p.get("verify_peer_bytes")
        payload = (f" A verify of k = {k_show} moved "
                   f"{fmt_bytes(p['verify_rpc_bytes_down']['median'])} from the workers "
                   + (f"to the coordinator and {fmt_bytes(between['median'])} between workers "
                      if between else "")
                   + f"(the logits of its {int(k_show) + 1} rows alone are "
                   f"{fmt_bytes((int(k_show) + 1) * n_vocab * 4)}) and took "
                   f"{p['verify_wall_ms']['median']:.1f} ms on the pool against "
                   f"{p['verify_compute_ms']['median']:.1f} ms alone.")
    return [
        f"{h} Agreement and cost of the pair",
        "",
        f"- Per-position greedy agreement a = **{bound['alpha']:.3f}** (Leviathan's alpha: the "
        f"draft's argmax at each of {result['agreement']['positions']} positions of the "
        f"target's own greedy output). llama.cpp's \"draft acceptance\" accepted/drafted is a "
        f"different number that falls with k; both are in the tables.",
        f"- Steps: the pool (b) {costs['pool_ms_per_token']:.2f} ms per token, the target "
        f"alone (a) {costs['single_ms_per_token']:.2f} ms.",
        f"- The draft's own cost (its layers and its {n_vocab}-row output matrix, on its own "
        f"server, no link): **{costs['draft_ms_per_token']['median']:.2f} ms per token**, "
        f"{costs['draft_over_single_target']:.3f} of the target alone; cost ratio c = "
        f"{bound['cost_ratio']:.3f} of a pool step.",
        f"- The logits payload every real pair shares (the verify's rows crossing the pool's "
        f"link): {n_vocab} x 4 B = {fmt_bytes(4 * n_vocab)} per verified position.{payload}",
        f"- Leviathan's bound S = E(a, k) / (k c + 1), E = (1 - a^(k+1)) / (1 - a): best k in "
        f"the sweep {bound['best_k']}, S = {bound['best_speedup']:.2f}x over (b).",
        "",
    ]


def headline_lines(h: dict[str, Any]) -> list[str]:
    """The headline bullets: (d) against (b), its bound, and against every other contender."""
    lines = []
    d = h.get("d_adaptive")
    if d:
        lines.append(f"- (d) Tightwad remote draft, adaptive k: **{d['tok_s']:.1f} tok/s "
                     f"({1e3 / d['tok_s']:.1f} ms/token), {fmt(d['vs_b'])}x the pool direct "
                     f"(b)**; accepted/drafted {fmt(d['acceptance'])}.")
    if h.get("d_best"):
        db = h["d_best"]
        lines.append(f"- (d) at its best fixed k = {db['k']}: {db['tok_s']:.1f} tok/s, "
                     f"{fmt(db['vs_b'])}x (b); Leviathan's bound {fmt(db['predicted_speedup'])}x, "
                     f"efficiency **{fmt(db['efficiency'])}**.")
    for key, label in (("c", "(c) native, draft on the coordinator"),
                       ("c2", "(c2) native, draft on the junk host's rpc-server"),
                       ("e", f"(e) Tightwad {LEGACY_VERSION}"), ("a", "(a) the target alone")):
        if f"d_adaptive_vs_{key}" in h:
            ref = h[key if key in ("e", "a") else f"{key}_best"]
            lines.append(f"- (d) adaptive / {label} (k = {ref['k']}, {ref['tok_s']:.1f} "
                         f"tok/s): **{fmt(h[f'd_adaptive_vs_{key}'])}x**; (d) best fixed k / "
                         f"it: {fmt(h.get(f'd_best_vs_{key}'))}x.")
    return lines


def profile_text(result: dict[str, Any]) -> str:
    """What the per-k table shows, against what Leviathan's bound assumes."""
    per_k = result["profile"]["per_k"]
    b = result["costs"]["pool_ms_per_token"]
    k = max(per_k, key=int)
    p = per_k[k]
    n = p["verify_wall_ms"]["n"]
    return (f"Timed by hand per k ({n} rounds each after a warm-up, medians): a draft call of k "
            "tokens through the drafter's link (in brackets: the drafter's own computing), a "
            "verify of context + k on the pooled coordinator and the same verify on the single "
            "server (compute alone), and the RPC traffic of the pooled verify as the relays "
            f"counted it. Leviathan's bound assumes a verify costs one pool step ({b:.1f} ms); "
            f"at k = {k} it costs {p['verify_wall_ms']['median'] / b:.2f} steps here, and the "
            f"draft call has a fixed {p['draft_wall_ms']['median'] - p['draft_server_ms']['median']:.1f}"
            " ms of link and HTTP on top of its computing: the component bound in the tables "
            f"charges both. Expected tokens per round E(a, k) at k = {k}: "
            f"{bm.expected_tokens(result['bound']['alpha'], int(k)):.2f}.")
