"""What placement measures: each worker device's time for a layer of THIS model, each worker
link's round trip and bandwidth, and the model's shape (:class:`placement.ModelShape`).

The compute probe runs the real layers through the worker's own ``ggml-rpc-server``: it writes
probe models that keep the model's metadata, embeddings, output layer and only its first few
blocks (real shapes, real weights, real quantization; stdlib only), starts a llama-server of
the pinned build with ``--rpc WORKER`` and every layer offloaded, and times short greedy decodes
and a (k+1)-token prompt. The difference between the two probe models is a number of layers on
that device: fixed costs (the output layer, the link's round trips, the coordinator's own work)
cancel. The larger probe model holds :data:`PROBE_BYTES` of layers (or the whole model), so that
a CPU worker is timed with its weights out of its caches, as in the real model. The link probe
is the RPC HELLO plus reading a scratch buffer back (:func:`tightwad.pool.rpcproto.hello`).

What a worker alone cannot show is what a chain of them adds: each host beyond the first passes
its hidden states back through the coordinator and handles its own graph commands (0.2-1.3 ms
per host on loopback on 2 shared cores, where a HELLO takes 0.1: docs/benchmarks-placement.md).
So where two or more workers were measured, one more llama-server runs the larger probe model
split evenly over all of them, and :func:`tightwad.pool.placement.hop_ms` turns its time into
each measurement's ``hop_ms``.

A worker serves one client at a time. Every probe starts with a HELLO, which is safe on a busy
worker (rpcproto's module doc); a worker that does not answer it (serving a coordinator) is
skipped and reported, never connected to by a probe llama-server.

``python -m tightwad.pool.probe --model M --rpc HOST:PORT,... [--bin-dir D]`` prints the
measurements as JSON (what the coordinator role keeps and feeds to the split rule).
"""

from __future__ import annotations

import argparse
import json
import mmap
import re
import struct
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tightwad import build as llama_build
from tightwad import defaults
from tightwad.pool import rpcproto
from tightwad.pool.gguf_info import GGUFError, read_info
from tightwad.pool.placement import Device, MiB, ModelShape, format_split, hop_ms
from tightwad.pool.procs import ProcessFailed, ProcessGroup

PROBE_BYTES = 256 * MiB
"""The larger probe model holds at least this much of the model's layers (or all of them):
a few small layers fit in a CPU's cache and run several times faster than the model's do."""
LINK_PROBE_BYTES = 4 * MiB
DECODE_TOKENS = 8
VERIFY_TOKENS = 9
"""A verify of k = 8 drafted tokens is a batch of 9."""
_BLOCK = re.compile(r"^blk\.(\d+)\.")
_STR, _ARR = 8, 9
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass(frozen=True)
class Tensor:
    name: str
    info: bytes
    """Its tensor-info record without the trailing offset (name, dims, type)."""
    offset: int
    size: int
    """Bytes to the next tensor's data (its own bytes and the alignment padding)."""


@dataclass(frozen=True)
class Layout:
    version: int
    kvs: list[tuple[str, bytes]]
    """Each metadata key and its raw record (key, type, value)."""
    tensors: list[Tensor]
    data_start: int
    alignment: int
    file_size: int


def _skip_value(buf: memoryview, pos: int, vtype: int) -> int:
    if vtype in _SCALAR_SIZE:
        return pos + _SCALAR_SIZE[vtype]
    if vtype == _STR:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    if vtype == _ARR:
        item, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item in _SCALAR_SIZE:
            return pos + _SCALAR_SIZE[item] * count
        for _ in range(count):
            pos = _skip_value(buf, pos, item)
        return pos
    raise GGUFError(f"unknown GGUF value type {vtype}")


def read_layout(path: Path) -> Layout:
    """The GGUF's metadata records and tensor table, as bytes to copy (stdlib only)."""
    info = read_info(path)  # validates magic, version and metadata first
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        buf = memoryview(mapped)
        try:
            n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
            pos, kvs = 24, []
            alignment = 32
            for _ in range(n_kv):
                start = pos
                (klen,) = struct.unpack_from("<Q", buf, pos)
                key = bytes(buf[pos + 8:pos + 8 + klen]).decode("utf-8", "replace")
                pos += 8 + klen
                (vtype,) = struct.unpack_from("<I", buf, pos)
                if key == "general.alignment":
                    (alignment,) = struct.unpack_from("<I", buf, pos + 4)
                pos = _skip_value(buf, pos + 4, vtype)
                kvs.append((key, bytes(buf[start:pos])))
            raw: list[tuple[str, bytes, int]] = []
            for _ in range(n_tensors):
                start = pos
                (nlen,) = struct.unpack_from("<Q", buf, pos)
                name = bytes(buf[pos + 8:pos + 8 + nlen]).decode("utf-8", "replace")
                pos += 8 + nlen
                (n_dims,) = struct.unpack_from("<I", buf, pos)
                pos += 4 + 8 * n_dims + 4
                record = bytes(buf[start:pos])
                (offset,) = struct.unpack_from("<Q", buf, pos)
                pos += 8
                raw.append((name, record, offset))
            data_start = -(-pos // alignment) * alignment
        except struct.error:
            raise GGUFError(f"{path}: truncated tensor table") from None
        finally:
            buf.release()
    ends = sorted({o for _, _, o in raw} | {info.size - data_start})
    tensors = []
    for name, record, offset in raw:
        nxt = next(e for e in ends if e > offset) if offset < ends[-1] else offset
        tensors.append(Tensor(name, record, offset, nxt - offset))
    return Layout(info.version, kvs, tensors, data_start, alignment, info.size)


def model_shape(path: Path, ctx_total: int = 0) -> ModelShape:
    """The model's shape for placement: its largest layer, its output layer, the KV cache of one
    layer for ``ctx_total`` positions (all slots together)."""
    info = read_info(path)
    layout = read_layout(path)
    n_layer = int(info.arch_value("block_count", 0))
    per_layer: dict[int, int] = {}
    sizes = {t.name: t.size for t in layout.tensors}
    for t in layout.tensors:
        if m := _BLOCK.match(t.name):
            per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + t.size
    output = sizes.get("output.weight", sizes.get("token_embd.weight", 0))
    kv = info.kv_cache_bytes(ctx_total) // max(1, n_layer) if ctx_total else 0
    return ModelShape(n_layer=n_layer, layer_bytes=max(per_layer.values(), default=0),
                      output_bytes=output, kv_layer_bytes=kv,
                      n_embd=int(info.arch_value("embedding_length", 0) or 0),
                      n_vocab=info.n_vocab)


def probe_layers(shape: ModelShape) -> tuple[int, int]:
    """The blocks of the two probe models: the larger holds :data:`PROBE_BYTES` of layers (at
    least 3, at most the model's), the smaller a third of that; their difference is what is
    timed."""
    hi = min(shape.n_layer, max(3, -(-PROBE_BYTES // max(1, shape.layer_bytes))))
    return max(1, hi // 3), hi


def write_probe_model(src: Path, dst: Path, n_layers: int) -> Path:
    """A copy of ``src`` with only its first ``n_layers`` blocks (``block_count`` set to match):
    the same shapes, types and weights per layer, the same embeddings and output layer."""
    info = read_info(src)
    arch = info.architecture
    layout = read_layout(src)
    kept = [t for t in layout.tensors
            if not (m := _BLOCK.match(t.name)) or int(m.group(1)) < n_layers]
    head = bytearray(b"GGUF" + struct.pack("<IQQ", layout.version, len(kept), len(layout.kvs)))
    count_key = f"{arch}.block_count"
    for key, record in layout.kvs:
        if key == count_key:
            kb = key.encode()
            (vtype,) = struct.unpack_from("<I", record, 8 + len(kb))
            fmt = {4: "<I", 5: "<i", 10: "<Q", 11: "<q"}.get(vtype)
            if fmt is None:
                raise GGUFError(f"{src}: {key} has an unexpected type {vtype}")
            record = record[:12 + len(kb)] + struct.pack(fmt, n_layers)
        head += record
    offset, placed = 0, []
    for t in kept:
        head += t.info + struct.pack("<Q", offset)
        placed.append((t, offset))
        offset += -(-t.size // layout.alignment) * layout.alignment
    head += bytes(-len(head) % layout.alignment)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(head)
        for t, at in placed:
            fout.seek(len(head) + at)
            fin.seek(layout.data_start + t.offset)
            left = t.size
            while left:
                chunk = fin.read(min(left, 16 * MiB))
                if not chunk:
                    raise GGUFError(f"{src}: tensor {t.name} runs past the end of the file")
                fout.write(chunk)
                left -= len(chunk)
        fout.truncate(len(head) + offset)
    return dst


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One worker endpoint's measurements (or why it has none)."""

    rpc: str
    free: int = 0
    layer_ms: float | None = None
    verify_layer_ms: float | None = None
    rtt_ms: float | None = None
    bandwidth_bps: float | None = None
    base_ms: float | None = None
    """ms/token of the smaller probe less its layers (stage, output layer, the coordinator)."""
    hop_ms: float | None = None
    """What one more host costs in a chain of the measured workers (the same on each)."""
    skipped: str = ""
    """Why it was not (fully) measured: busy serving a coordinator, unreachable, ..."""
    note: str = ""
    """What is uncertain about a measurement that was taken."""

    def device(self, name: str | None = None, free: int | None = None) -> Device:
        return Device(name or self.rpc, self.free if free is None else free, self.layer_ms,
                      self.verify_layer_ms, self.rtt_ms, self.bandwidth_bps,
                      self.rpc.rsplit(":", 1)[0], self.base_ms, self.hop_ms)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Measurement:
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def _split(rpc: str) -> tuple[str, int]:
    host, _, port = rpc.rpartition(":")
    return host.strip("[]"), int(port)


def measure_link(rpc: str, *, timeout: float = 2.0,
                 nbytes: int = LINK_PROBE_BYTES) -> Measurement:
    """RTT and bandwidth from here to ``rpc`` (and its free memory), or why not: a worker that
    does not answer HELLO is serving a client and is left alone."""
    host, port = _split(rpc)
    try:
        hello = rpcproto.hello(host, port, timeout=timeout, measure_bytes=nbytes)
    except rpcproto.Busy:
        return Measurement(rpc, skipped="busy (serving a coordinator): not probed")
    except rpcproto.Silent:
        return Measurement(rpc, skipped="its one-client backlog is full (serving a "
                           "coordinator) or a firewall drops us: not probed")
    except rpcproto.ProbeError as exc:
        return Measurement(rpc, skipped=str(exc))
    # The HELLO exchange, not the TCP handshake: a relay or proxy on the way (or the link
    # emulator) accepts the handshake itself.
    return Measurement(rpc, free=hello.free_memory, rtt_ms=round(hello.rtt_s * 1000, 3),
                       bandwidth_bps=hello.download_bps)


def _timed(group: ProcessGroup, model: Path, rpcs: Sequence[str], repeats: int,
           split: Sequence[float] = ()) -> tuple[float, float]:
    """Fastest ms per decoded token and per (k+1)-token prompt batch of ``model`` on ``rpcs``
    (``--tensor-split split``) over ``repeats`` (other work on a machine only adds time: the
    fastest run is the closest to what the devices themselves cost)."""
    args = list(defaults.COORDINATOR_ARGS)
    if split:
        args += ["--tensor-split", format_split(split)]
    server = group.llama_server(model, name="probe", rpc=list(rpcs), ctx=256, slots=1,
                                timeout=600, args=args)
    try:
        body = {"prompt": [1] * VERIFY_TOKENS, "n_predict": DECODE_TOKENS, "temperature": 0,
                "cache_prompt": False, "ignore_eos": True}
        server.post("/completion", body, timeout=300)  # warm-up: graph allocation
        decode, batch = [], []
        for _ in range(repeats):
            timings = server.post("/completion", body, timeout=300).get("timings") or {}
            decode.append(float(timings["predicted_ms"]) / max(1, int(timings["predicted_n"])))
            batch.append(float(timings["prompt_ms"]))
        return min(decode), min(batch)
    finally:
        server.stop()


def measure_compute(m: Measurement, probe_models: dict[int, Path], bin_dir: Path,
                    log_dir: Path, repeats: int = 3) -> Measurement:
    """Per-layer decode and batch times of ``m.rpc`` from the two probe models; skipped when the
    worker does not answer a HELLO first (serving a coordinator)."""
    if m.skipped:
        return m
    host, port = _split(m.rpc)
    try:
        rpcproto.hello(host, port, timeout=2.0, devices=False)
    except rpcproto.ProbeError as exc:
        m.skipped = f"not idle before the compute probe: {exc}"
        return m
    lo, hi = sorted(probe_models)
    runs: dict[int, list[tuple[float, float]]] = {lo: [], hi: []}
    try:
        with ProcessGroup(bin_dir, log_dir) as group:
            # A busy machine can make the larger probe look no slower than the smaller: one
            # more pass of both before falling back to the larger probe's time per layer.
            for _ in range(2):
                for n in (lo, hi):
                    runs[n].append(_timed(group, probe_models[n], [m.rpc], repeats))
                d_lo, b_lo = (min(x) for x in zip(*runs[lo]))
                d_hi, b_hi = (min(x) for x in zip(*runs[hi]))
                if d_hi > d_lo and b_hi > b_lo:
                    break
    except (ProcessFailed, OSError, KeyError, ValueError) as exc:
        m.skipped = f"compute probe failed: {str(exc)[:300]}"
        return m
    if d_hi > d_lo and b_hi > b_lo:
        m.layer_ms = round((d_hi - d_lo) / (hi - lo), 3)
        m.verify_layer_ms = round((b_hi - b_lo) / (hi - lo), 3)
        m.base_ms = round(max(0.0, d_lo - lo * m.layer_ms), 3)
    else:  # too noisy to tell the layers from the rest: an upper bound, no fixed part
        m.layer_ms, m.verify_layer_ms, m.base_ms = (round(d_hi / hi, 3), round(b_hi / hi, 3),
                                                    0.0)
        m.note = (f"{hi} layers timed no slower than {lo} (a busy machine?): "
                  f"{d_hi:.2f} ms/token taken as all layers")
    return m


def measure_chain(chain: Sequence[Measurement], model: Path, bin_dir: Path, log_dir: Path,
                  repeats: int = 3) -> None:
    """Each measurement's ``hop_ms``: ``model`` split evenly over all of ``chain`` (each
    measured alone, each with a layer), timed against the sum of its parts. Every worker must
    answer a HELLO first (none serving a coordinator); a chain that cannot be timed leaves
    ``hop_ms`` unset and says why in each ``note``."""
    shape = model_shape(model)
    split = [1.0] * len(chain)
    try:
        for m in chain:
            host, port = _split(m.rpc)
            rpcproto.hello(host, port, timeout=2.0, devices=False)
        with ProcessGroup(bin_dir, log_dir) as group:
            decode, _ = _timed(group, model, [m.rpc for m in chain], repeats, split)
        hop = hop_ms(shape, [m.device() for m in chain], split, decode)
    except (rpcproto.ProbeError, ProcessFailed, OSError, KeyError, ValueError) as exc:
        for m in chain:
            m.note = "; ".join(filter(None, [m.note, f"chain probe failed: {str(exc)[:200]}"]))
        return
    for m in chain:
        m.hop_ms = hop


def measure(model: Path, rpcs: Sequence[str], bin_dir: Path, *, work_dir: Path | None = None,
            compute: bool = True, repeats: int = 3,
            progress: Callable[[str], None] | None = None) -> list[Measurement]:
    """Link (and with ``compute``, per-layer) measurements of every worker in ``rpcs``."""
    found = [measure_link(r) for r in rpcs]
    if not compute or not any(not m.skipped for m in found):
        return found
    with tempfile.TemporaryDirectory(prefix="tightwad-probe-", dir=work_dir) as tmp:
        shape = model_shape(model)
        models = {n: write_probe_model(model, Path(tmp) / f"probe-{n}.gguf", n)
                  for n in probe_layers(shape)}
        for m in found:
            if progress:
                progress(f"timing layers on {m.rpc}")
            measure_compute(m, models, bin_dir, Path(tmp) / "logs", repeats)
        # Every worker of the chain holds at least one of the model's layers.
        chain = [m for m in found if not m.skipped and m.layer_ms is not None][:shape.n_layer]
        if len(chain) >= 2:
            n = max(len(chain), *models)
            if n not in models:
                models[n] = write_probe_model(model, Path(tmp) / f"probe-{n}.gguf", n)
            if progress:
                progress(f"timing a chain of {len(chain)} workers")
            measure_chain(chain, models[n], bin_dir, Path(tmp) / "logs", repeats)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tightwad.pool.probe", description=__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--rpc", required=True, help="HOST:PORT,... of the workers")
    p.add_argument("--bin-dir", type=Path, help="the pinned build's bin dir (default: cached)")
    p.add_argument("--link-only", action="store_true", help="RTT and bandwidth only")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    bin_dir = args.bin_dir
    if bin_dir is None and not args.link_only:
        found = llama_build.cached_build(llama_build.default_cache_dir(),
                                         llama_build.build_key("cpu"))
        if found is None:
            print("probe: no cached llama.cpp build; pass --bin-dir", file=sys.stderr)
            return 2
        bin_dir = found.bin_dir
    try:
        results = measure(args.model, [r for r in args.rpc.split(",") if r], bin_dir or Path(),
                          compute=not args.link_only, repeats=args.repeats,
                          progress=lambda s: print(f"probe: {s}", file=sys.stderr))
    except (GGUFError, OSError, ValueError) as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return 2
    print(json.dumps([m.as_dict() for m in results], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
