#!/usr/bin/env python3
"""The pool over an emulated link, side by side, against the speculative-decoding bound.

ONE run, the same prompts and the same link profile for every configuration:

- ``a``  the target on one plain llama-server (no pool, no network);
- ``b``  the pool: 4 ``ggml-rpc-server`` workers behind link relays, a coordinator llama-server;
- ``c``  the pool + llama.cpp's native speculation, draft on the coordinator's CPU
         (``--spec-type draft-simple --spec-draft-model ... --spec-draft-device none``);
- ``c2`` the same, with the draft on a junk host's own ``ggml-rpc-server`` behind its own relay
         (``--spec-draft-device RPC4``, target layers kept off it with ``--tensor-split``);
- ``d``  the pool + Tightwad remote-draft speculation through the proxy
         (``python -m tightwad.server``), the drafter llama-server behind its own relay;
- ``e``  the original Tightwad 0.5.4 proxy (its own virtualenv) against the same pool and drafter.

Draft lengths k in ``--ks`` for c, c2 and d, plus each one's own choice (d: the adaptive rule;
c/c2: llama.cpp's default ``--spec-draft-n-max``); concurrency ``--concurrency`` streams for b,
c (default k) and d (adaptive), with p50/p99 latency and a steady-state round profile under
load (coordinator batches per second, tokens, RPC round trips and bytes per batch). Every
request is greedy (temperature 0, ``ignore_eos``) with ``--tokens`` tokens.

Two model pairs (``--vocab``): the small byte-level vocabulary (429 tokens), or a real 128k
vocabulary (Llama 3's llama-bpe from the pinned tree), where a verify's logits payload and the
draft's own output matrix are reported apart.

Method: configurations are interleaved (each repetition visits every configuration once, in a
rotated order), each visit on a freshly started coordinator (and proxy); the link relays run in
a process of their own; medians come with bootstrap 95% confidence intervals and absolute
ms/token; the issues' targets are printed as measured PASS/MISS lines.

Measured per configuration: generated tok/s and time to first token (median and quartiles over
prompts x repetitions), acceptance (accepted/drafted) and tokens per verify round, RPC round
trips and bytes per generated token (from the relays), ratios to (b). For c and d: the
Leviathan bound S = E(a, k) / (k c + 1) for the measured per-position agreement a and cost
ratio c (:mod:`tightwad_dev.benchmath`), and efficiency = measured / predicted; beside it, the
bound from the measured component costs (draft call, verify of k tokens). Greedy outputs are
compared with (a)'s. A profile of one round per k times the draft call and the verify, and
counts the verify's RPC bytes.

Writes JSON (``--json``), a plot (``--plot``) and a markdown report (``--markdown``)::

    .venv/bin/python bench/pool_bench.py --profile wifi --json bench-wifi.json \\
        --plot docs/benchmarks.png --markdown docs/benchmarks.md

This file is the command line; the ``poolbench`` package beside it does the work (processes,
measurements, the pure summary, the report and the plot).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Run as a script, this file's directory (bench/) is on sys.path: its modules import as
# top-level ones.
from benchenv import binary_version, llama_binaries, machine_info, stop_on_sigterm, write_result
from poolbench.plot import write_plot
from poolbench.report import write_markdown
from poolbench.scenarios import log, measure_all
from poolbench.services import coordinator_args, drafter_args, legacy_venv, pool_args
from poolbench.settings import (
    DEFAULT_LEGACY_VENV,
    FULL_RUN,
    LABELS,
    LEGACY_VERSION,
    PROMPTS,
    SLOTS,
    VERIFY_MAX_TOKENS,
)
from poolbench.summary import finish
from poolbench.tables import config_table

from tightwad import build as llama_build
from tightwad.pool.linkemu import PROFILES, LinkProfile, adjust_profile
from tightwad_dev.benchmodels import BenchPair, ensure_bench_models, ensure_real_vocab_models


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="wifi", choices=list(PROFILES),
                   help="link emulated to every worker and to the drafter (default wifi)")
    p.add_argument("--vocab", default="byte-bpe", choices=("byte-bpe", "llama-bpe"),
                   help="the model pair: small byte-level vocabulary (429 tokens, default) or "
                        "the real 128k llama-bpe one")
    p.add_argument("--tiny-models", action="store_true",
                   help="with --vocab llama-bpe: the demo pair (8 layers x 128), for smoke tests")
    p.add_argument("--tokens", type=int, default=FULL_RUN["tokens"],
                   help="generated tokens per request")
    p.add_argument("--prompts", type=int, default=FULL_RUN["prompts"],
                   help=f"how many of the {len(PROMPTS)} built-in prompts")
    p.add_argument("--reps", type=int, default=FULL_RUN["reps"],
                   help="repetitions (each visits every configuration once, interleaved)")
    p.add_argument("--ks", default=",".join(map(str, FULL_RUN["ks"])),
                   help="draft lengths of the sweep")
    p.add_argument("--concurrency", default=",".join(map(str, FULL_RUN["concurrency"])),
                   help="simultaneous streams (for b, c and d)")
    p.add_argument("--configs", default="a,b,c,c2,d,e", help="which configurations to run")
    p.add_argument("--workers", type=int, default=FULL_RUN["workers"],
                   help="RPC workers of the pool")
    p.add_argument("--no-peers", dest="peers", action="store_false",
                   help="workers pass hidden states through the coordinator (GET, then SET), "
                        "as stock llama.cpp does, instead of to each other")
    p.add_argument("--threads", type=int, default=1, help="threads per llama.cpp process")
    p.add_argument("--legacy-venv", type=Path, default=Path(DEFAULT_LEGACY_VENV),
                   help=f"virtualenv holding tightwad {LEGACY_VERSION} for (e)")
    p.add_argument("--install-legacy", action="store_true",
                   help=f"create that virtualenv with pip install tightwad=={LEGACY_VERSION}")
    p.add_argument("--bin-dir", type=Path, help="llama.cpp binaries (default: the cached build)")
    p.add_argument("--json", type=Path, help="write everything measured")
    p.add_argument("--plot", type=Path, help="write the PNG plot")
    p.add_argument("--markdown", type=Path, help="write the markdown report")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="measure nothing: write --plot and --markdown from a saved --json")
    p.add_argument("--beside", type=Path, metavar="JSON",
                   help="with --render: another run (the other vocabulary) shown in its own "
                        "section")
    p.add_argument("--also", type=Path, action="append", default=[], metavar="JSON",
                   help="with --render: other runs' JSON, compared in a repeatability table")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the process logs (and the workers' tensor caches) after success")
    args = p.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.configs = [c for c in args.configs.split(",") if c]
    if unknown := set(args.configs) - set(LABELS):
        p.error(f"unknown configurations: {sorted(unknown)}")
    if args.tiny_models and args.vocab != "llama-bpe":
        p.error("--tiny-models goes with --vocab llama-bpe")
    if not {"a", "b"} <= set(args.configs):
        p.error("(a) and (b) are the references: --configs must include a and b")
    if not all(1 <= k <= VERIFY_MAX_TOKENS for k in args.ks):
        p.error(f"every k must lie in 1..{VERIFY_MAX_TOKENS}")
    if not 1 <= args.prompts <= len(PROMPTS):
        p.error(f"--prompts must lie in 1..{len(PROMPTS)}")
    if max(args.concurrency) > SLOTS:
        p.error(f"at most {SLOTS} streams (the servers' slots)")
    return args


def render(args: argparse.Namespace) -> int:
    """Write the plot and the markdown again from a saved ``--json`` (no measuring)."""
    result = json.loads(args.render.read_text())
    result["json_path"] = "" if args.render.is_absolute() else str(args.render)
    result["repeats"] = [json.loads(path.read_text()) for path in args.also]
    result["repeat_paths"] = [str(path) for path in args.also if not path.is_absolute()]
    if args.beside:
        result["beside"] = json.loads(args.beside.read_text())
        result["beside_path"] = "" if args.beside.is_absolute() else str(args.beside)
    print(config_table(result), flush=True)
    write_reports(result, args)
    return 0


def write_reports(result: dict[str, Any], args: argparse.Namespace) -> None:
    if args.plot:
        write_plot(result, args.plot)
    if args.markdown:
        write_markdown(result, args.markdown, args.plot)


def new_result(args: argparse.Namespace, command: str, machine: dict[str, Any],
               profile: LinkProfile, bin_dir: Path, build_name: str, pair: BenchPair,
               legacy_note: str) -> dict[str, Any]:
    """What the run is, before it measures anything: settings, machine, link, build, models."""
    return {
        "command": command, "settings": {**{k: v for k, v in vars(args).items()
                                            if k not in ("legacy_venv", "bin_dir", "json",
                                                         "plot", "markdown",
                                                         "keep_logs", "render",
                                                         "also", "install_legacy",
                                                         "beside")}},
        "pool_args": pool_args(), "coordinator_args": coordinator_args(),
        "drafter_args": drafter_args(),
        "machine": machine, "link": profile.describe(),
        "llama_cpp": f"{binary_version(bin_dir / 'llama-server')}, build {build_name}",
        "models": {
            "target": {"file": pair.target.name, "mb": round(pair.target.stat().st_size / 1e6, 1),
                       **{key: getattr(pair.target_spec, key) for key in (
                           "n_layer", "n_embd", "n_head", "n_ff", "deep_layer_scale",
                           "n_core_layers", "output_scale", "seed")}},
            "draft": {"file": pair.draft.name, "mb": round(pair.draft.stat().st_size / 1e6, 1),
                      "n_layer": pair.draft_spec.n_written_layers},
        },
        "legacy_note": legacy_note,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(args)
    command = shlex.join([".venv/bin/python", "bench/pool_bench.py",
                          *(sys.argv[1:] if argv is None else argv)])
    cache = llama_build.default_cache_dir()
    bin_dir, build_name = llama_binaries(args.bin_dir, cache)
    if args.vocab == "llama-bpe":
        pair = ensure_real_vocab_models(cache / "models",
                                        llama_build.fetch_source(cache) / "models",
                                        tiny=args.tiny_models)
    else:
        pair = ensure_bench_models(cache / "models")
    profile = adjust_profile(args.profile)
    machine = machine_info()
    venv, legacy_why = (None, "not requested")
    if "e" in args.configs:
        venv, legacy_why = legacy_venv(args.legacy_venv.expanduser(), args.install_legacy)
        if venv is None:
            log(f"(e) skipped: {legacy_why}")
    log(f"pool_bench: {command}")
    log(f"link {profile.describe()}; {machine['cpus']} CPUs, load {machine['loadavg_start']}")
    result = new_result(args, command, machine, profile, bin_dir, build_name, pair,
                        "" if venv or "e" not in args.configs else f"(e) not run: {legacy_why}")
    started = time.monotonic()
    bench = measure_all(args, bin_dir, pair, profile, venv, result)
    machine["loadavg_end"] = os.getloadavg()
    result["elapsed_s"] = time.monotonic() - started
    finish(result, bench.samples, [str(k) for k in args.ks])
    log(f"done in {result['elapsed_s'] / 60:.1f} min")
    print(config_table(result), flush=True)
    print(json.dumps(result["headline"], indent=1), flush=True)
    for issue, lines in result["targets"].items():
        for t in lines:
            verdict = {True: "PASS", False: "MISS", None: "not measured"}[t["pass"]]
            print(f"issue {issue}: {t['name']}: {t['value']} (wanted {t['op']} "
                  f"{t['threshold']}): {verdict}", flush=True)
    result["json_path"] = str(args.json) if args.json and not args.json.is_absolute() else ""
    if args.json:
        write_result(args.json, json.dumps(result, indent=1))
    write_reports(result, args)
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
