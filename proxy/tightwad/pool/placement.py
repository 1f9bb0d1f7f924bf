"""Pure arithmetic of a pool: where the layers go, and who plays which role.

``--tensor-split`` takes one weight per device, RPC devices in ``--rpc`` order. llama.cpp gives
each device a share of the ``n_layer + 1`` "layers" (the output layer counts as the last one)
proportional to its weight, so integer weights are exact layer counts, and the output layer lands
on the last device with a non-zero weight.

:func:`place` is the one split rule: ``tightwad init`` and ``doctor`` print it, the coordinator
role (filter_plugins/tightwad_pool.py) applies it at deploy time, the local pool and the
benchmarks start with it. With measurements (:mod:`tightwad.pool.probe`: each device's time for
one layer, each worker link's round trip and bandwidth) it minimises the estimated time per
token; without them it falls back to :func:`propose_split`, proportional to each device's usable
memory, and says so.

The cost model (docs/architecture.md: a pooled decode pays its stages strictly in sequence)::

    ms/token  = sum over used devices of  layers x layer_ms + stage cost
                + the output layer on its device (compute + its logits over the link)
                + (used hosts - 1) x hop_ms
    stage     = STAGE_ROUND_TRIPS (1) x RTT + the activations over the link's bandwidth

``hop_ms`` is what each host in the chain beyond the first costs on top of its probed parts (the
hidden states' trip through the coordinator, each worker's handling of its graph commands): the
probe measures one chain of all idle workers against this model (:func:`hop_ms`).

A verify of k tokens is the same with batch-of-(k+1) layer times and k+1 rows of activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from tightwad.llamaserver.layers import layer_devices

MiB = 1024 * 1024
GiB = 1024 * MiB
HEADROOM_MIN = 256 * MiB
HEADROOM_FRACTION = 0.10


def usable(free: int) -> int:
    """What a device with ``free`` bytes can give to weights (after a compute headroom)."""
    return max(0, free - max(HEADROOM_MIN, int(free * HEADROOM_FRACTION)))


def propose_split(free: Sequence[int], digits: int = 3) -> list[float]:
    """Proportions (summing to 1) of the usable memory of each device.

    A device with nothing usable gets 0 (llama.cpp then puts no layer on it). All-zero input
    falls back to an even split, so the result is always a valid ``--tensor-split``.
    """
    if not free:
        return []
    shares = [usable(f) for f in free]
    total = sum(shares)
    if total <= 0:
        return [round(1 / len(free), digits)] * len(free)
    split = [round(s / total, digits) for s in shares]
    # Put the rounding error on the largest share so the list sums to exactly 1.
    error = round(1 - sum(split), digits)
    biggest = max(range(len(split)), key=split.__getitem__)
    split[biggest] = round(split[biggest] + error, digits)
    return split


def format_split(split: Sequence[float]) -> str:
    """The ``--tensor-split`` argument: comma-separated, no trailing zeros."""
    return ",".join(f"{x:g}" for x in split)


@dataclass(frozen=True)
class Fit:
    need: int
    have: int

    @property
    def ok(self) -> bool:
        return self.have >= self.need

    @property
    def margin(self) -> int:
        return self.have - self.need


def pool_fit(model_bytes: int, kv_bytes: int, free: Sequence[int]) -> Fit:
    """Do the weights and the KV cache fit on the devices (after headroom)?"""
    return Fit(model_bytes + kv_bytes, sum(usable(f) for f in free))


@dataclass(frozen=True)
class Candidate:
    name: str
    ram: int
    """System memory (bytes); the coordinator maps the whole model file."""
    device_memory: int = 0


def choose_coordinator(hosts: Sequence[Candidate], model_bytes: int) -> Candidate | None:
    """The host with the most RAM, provided it holds the model file; None if none does."""
    fitting = [h for h in hosts if h.ram >= model_bytes]
    return max(fitting, key=lambda h: (h.ram, h.name), default=None)


def choose_drafter(hosts: Sequence[Candidate], exclude: Sequence[str] = ()) -> Candidate | None:
    """A small box: the host with the least device memory that is not otherwise busy.

    Drafting is cheap; the big devices are worth more in the pool. Falls back to the excluded
    hosts (usually the coordinator) when nothing else is there.
    """
    free = [h for h in hosts if h.name not in exclude] or list(hosts)
    return min(free, key=lambda h: (h.device_memory, h.ram, h.name), default=None)


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1024:.0f} KiB" if abs(n) >= 1024 else f"{int(n)} B"


# --- the speed-aware rule ---------------------------------------------------------------------

STAGE_ROUND_TRIPS = 1.0
"""Blocking round trips one pipeline stage costs per forward (docs/architecture.md: about one
per worker per token; bench/placement_bench.py: a worker behind a 15 ms link costs ~17 ms)."""
TOP_N_ROW_BYTES = 3 * 32 * 4
"""Logits bytes per output row with the top-n in the graph (patch 0005, ``--output-top-n``)."""
MAX_EXHAUSTIVE = 12
"""Up to this many devices every subset is tried; beyond, the fastest-first prefixes."""
MODES = ("auto", "memory", "explicit")
SPEED_MARGIN = 0.15
"""A speed-aware split over the same devices as the memory-proportional one (layers or the
output layer moved between them) replaces it only where predicted this much faster. Such a
split bets on small differences of measured times, which a probe on a busy machine can get 2x
wrong for identical devices (bench/placement_bench.py, uniform profile: 0.5-1.3 ms per layer,
RTTs of 0.1-2.8 ms on loopback; a split chosen on them ran at 0.87x); real junk differs by
more. Leaving a slow or far host out is not held back: it saves whole stages."""


class PlacementError(ValueError):
    """The model does not fit, or the input is inconsistent; the message says which."""


@dataclass(frozen=True)
class ModelShape:
    """What placement needs to know of the model (from its GGUF, :mod:`tightwad.pool.probe`)."""

    n_layer: int
    layer_bytes: int
    """Weights of one repeating layer (the largest, to be safe)."""
    output_bytes: int
    """Weights of the output layer (``output.weight``, or the tied embedding matrix)."""
    kv_layer_bytes: int = 0
    """KV cache of one layer at the configured context of all slots together."""
    n_embd: int = 4096
    n_vocab: int = 32000


@dataclass(frozen=True)
class Device:
    """One RPC worker device as placement sees it (``--rpc`` order is the list's order)."""

    name: str
    free: int
    """Free bytes (the worker's device memory, or the CPU worker's available RAM)."""
    layer_ms: float | None = None
    """Measured time of one layer for one token; None: not measured."""
    verify_layer_ms: float | None = None
    """Measured time of one layer for a batch of k+1 tokens (None: as ``layer_ms``)."""
    rtt_ms: float | None = None
    """Round trip from the coordinator; None: not measured."""
    bandwidth_bps: float | None = None
    """Bytes/s from the worker to the coordinator; None: not measured (taken as unlimited)."""
    host: str = ""
    base_ms: float | None = None
    """The probe's ms/token less its layers: this device's stage and output layer, plus the
    coordinator's own work per token (sampling, the graph, HTTP), which every split pays."""
    hop_ms: float | None = None
    """What one more host in a chain costs beyond its layers and stage (the pool's chain probe,
    :func:`hop_ms`; the same figure on each device it measured); None: not measured."""

    @property
    def measured(self) -> bool:
        return self.layer_ms is not None and self.rtt_ms is not None


@dataclass(frozen=True)
class Estimate:
    """One split and its predicted cost."""

    layers: tuple[int, ...]
    """Repeating layers per device, in ``--rpc`` order."""
    output: int
    """Index of the device that holds the output layer."""
    ms_token: float | None
    ms_verify: float | None
    """Predicted ms per token and per verify of ``k`` tokens (None: devices not measured)."""

    @property
    def used(self) -> tuple[int, ...]:
        return tuple(i for i, n in enumerate(self.layers) if n or i == self.output)


@dataclass(frozen=True)
class Placement:
    """The rule's answer and its reasoning."""

    mode: str
    """What decided: ``speed`` (measured), ``memory`` (proportional), ``explicit``."""
    order: tuple[int, ...]
    """Device indices in the ``--rpc`` order to start the coordinator with (the output layer's
    device last among those with layers)."""
    split: tuple[float, ...]
    """``--tensor-split`` weights in ``order`` (integer layer counts, the output counted)."""
    chosen: Estimate
    memory: Estimate
    """What the memory-proportional split gives (for comparison)."""
    reason: str
    names: tuple[str, ...] = ()

    @property
    def tensor_split(self) -> str:
        return format_split(self.split)

    @property
    def speedup(self) -> float | None:
        """Predicted tok/s of the chosen split over memory-proportional (None: unmeasured)."""
        if self.chosen.ms_token and self.memory.ms_token:
            return self.memory.ms_token / self.chosen.ms_token
        return None

    def describe(self) -> str:
        """One paragraph: the split, the predicted costs, the alternative, why."""
        names = [self.names[i] if i < len(self.names) else str(i)
                 for i in range(len(self.chosen.layers))]

        def ms(e: Estimate) -> str:
            return (f"{e.ms_token:.1f} ms/token, {e.ms_verify:.1f} ms/verify"
                    if e.ms_token is not None and e.ms_verify is not None else "not predicted")

        text = f"{self.mode}: layers {_describe(self.chosen, names)} ({ms(self.chosen)})"
        if self.mode != "memory":
            text += (f"; memory-proportional: {_describe(self.memory, names)} "
                     f"({ms(self.memory)})")
        return f"{text}; {self.reason}"

    def as_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "order": list(self.order), "tensor_split": self.tensor_split,
                "layers": list(self.chosen.layers), "output": self.chosen.output,
                "ms_token": self.chosen.ms_token, "ms_verify": self.chosen.ms_verify,
                "memory_layers": list(self.memory.layers),
                "memory_ms_token": self.memory.ms_token, "reason": self.reason,
                "description": self.describe()}


def layers_from_split(split: Sequence[float], n_layer: int) -> tuple[tuple[int, ...], int]:
    """The layers llama.cpp gives each device for ``--tensor-split split`` with every layer
    offloaded (:func:`tightwad.llamaserver.layers.layer_devices`); and the output layer's
    device."""
    if not split or float(sum(split)) <= 0:
        raise PlacementError("a tensor split needs at least one positive weight")
    devices = layer_devices(split, n_layer)
    counts = [0] * len(split)
    for device in devices[:-1]:
        assert device is not None  # every layer is offloaded
        counts[device] += 1
    output = devices[-1]
    assert output is not None
    return tuple(counts), output


def _stage_ms(d: Device, act_bytes: float) -> float:
    rtt = d.rtt_ms or 0.0
    bw = d.bandwidth_bps
    return STAGE_ROUND_TRIPS * rtt + (act_bytes / bw * 1000 if bw else 0.0)


def _output_ms(model: ModelShape, d: Device, rows: int, per_layer: float) -> float:
    bw = d.bandwidth_bps
    return (model.output_bytes / max(1, model.layer_bytes) * per_layer
            + (rows * TOP_N_ROW_BYTES / bw * 1000 if bw else 0.0))


def overhead_ms(model: ModelShape, devices: Sequence[Device]) -> float:
    """The coordinator's own time per token, the same for every split: the median over the
    probed devices of what their probe took beyond its layers, stage and output layer."""
    rest = sorted(max(0.0, d.base_ms - _stage_ms(d, model.n_embd * 4.0)
                      - _output_ms(model, d, 1, d.layer_ms or 0.0))
                  for d in devices if d.base_ms is not None and d.measured)
    return rest[len(rest) // 2] if rest else 0.0


def _hop(devices: Sequence[Device]) -> float:
    """The pool's cost per extra host: the median of the devices' chain-probe figures."""
    hops = sorted(d.hop_ms for d in devices if d.hop_ms is not None)
    return hops[len(hops) // 2] if hops else 0.0


def _estimate(model: ModelShape, devices: Sequence[Device], layers: Sequence[int], output: int,
              k: int) -> Estimate:
    used = [i for i in range(len(devices)) if layers[i] or i == output]
    if not all(devices[i].measured for i in used):
        return Estimate(tuple(layers), output, None, None)
    act = model.n_embd * 4.0  # f32 activations per token
    fixed = overhead_ms(model, devices) + (len(used) - 1) * _hop(devices)

    def cost(rows: int) -> float:
        total = fixed
        for i, d in enumerate(devices):
            if not layers[i] and i != output:
                continue
            per_layer = float(d.layer_ms or 0.0)
            if rows > 1 and d.verify_layer_ms is not None:
                per_layer = d.verify_layer_ms
            total += layers[i] * per_layer + _stage_ms(d, act * rows)
            if i == output:
                total += _output_ms(model, d, rows, per_layer)
        return total

    return Estimate(tuple(layers), output, round(cost(1), 3), round(cost(k + 1), 3))


def hop_ms(model: ModelShape, devices: Sequence[Device], split: Sequence[float],
           measured_ms: float) -> float:
    """What each host beyond the first costs in a chain beyond this model's sum of its parts:
    ``measured_ms`` per token of ``model`` over ``devices`` (each measured alone, without a
    ``hop_ms``) with ``--tensor-split split``, against the prediction. Never below 0: a chain
    makes no host cheaper, and where the parts already over-predict (a CPU quota lets a stage's
    short bursts run faster than the probe's steady run) the error is theirs."""
    layers, output = layers_from_split(split, model.n_layer)
    alone = [replace(d, hop_ms=None) for d in devices]
    est = _estimate(model, alone, layers, output, 0)
    if est.ms_token is None:
        raise PlacementError("a chain's hop cost needs every device in it measured")
    if len(est.used) < 2:
        raise PlacementError("a chain's hop cost needs at least two devices with layers")
    return round(max(0.0, (measured_ms - est.ms_token) / (len(est.used) - 1)), 3)


def capacity(model: ModelShape, d: Device, with_output: bool) -> int:
    """Layers (with their KV cache) a device holds after headroom (and the output layer)."""
    room = usable(d.free) - (model.output_bytes if with_output else 0)
    per = model.layer_bytes + model.kv_layer_bytes
    return max(0, room // per) if per > 0 else model.n_layer


def _fill(model: ModelShape, devices: Sequence[Device], used: Sequence[int], output: int,
          k: int) -> list[int] | None:
    """Cheapest layer counts over exactly ``used`` (each at least one layer), or None if they
    do not hold the model. The cost is linear in the layers: fill the fastest first."""
    caps = {i: capacity(model, devices[i], i == output) for i in used}
    if any(c < 1 for c in caps.values()) or sum(caps.values()) < model.n_layer \
            or len(used) > model.n_layer:
        return None

    def per_layer(i: int) -> float:
        d = devices[i]
        return float((d.verify_layer_ms if k and d.verify_layer_ms is not None else d.layer_ms)
                     or 0.0)

    layers = [0] * len(devices)
    for i in used:
        layers[i] = 1
    left = model.n_layer - len(used)
    for i in sorted(used, key=lambda j: (per_layer(j), j)):
        take = min(left, caps[i] - 1)
        layers[i] += take
        left -= take
    return layers if left == 0 else None


def _candidates(devices: Sequence[Device]) -> list[tuple[int, ...]]:
    n = len(devices)
    if n <= MAX_EXHAUSTIVE:
        subsets = [tuple(i for i in range(n) if mask >> i & 1) for mask in range(1, 1 << n)]
    else:
        fastest = sorted(range(n), key=lambda i: ((devices[i].layer_ms or 0.0), i))
        subsets = [tuple(sorted(fastest[:m])) for m in range(1, n + 1)]
    return sorted(subsets, key=lambda s: (len(s), s))


def _order(n: int, layers: Sequence[int], output: int) -> tuple[int, ...]:
    """Inventory order, unless a device after the output layer's holds layers: then the output
    device moves just behind the last of them (the least reordering of ``--rpc``)."""
    if not any(layers[i] for i in range(output + 1, n)):
        return tuple(range(n))
    rest = [i for i in range(n) if i != output]
    last = max(pos for pos, i in enumerate(rest) if layers[i])
    return tuple(rest[:last + 1] + [output] + rest[last + 1:])


def _weights(layers: Sequence[int], output: int, order: Sequence[int]) -> tuple[float, ...]:
    return tuple(float(layers[i] + (1 if i == output else 0)) for i in order)


def _fits(model: ModelShape, devices: Sequence[Device], layers: Sequence[int],
          output: int) -> bool:
    return all(layers[i] <= capacity(model, d, i == output) for i, d in enumerate(devices))


def _describe(e: Estimate, names: Sequence[str]) -> str:
    return ", ".join(f"{names[i]}: {n}" + (" +output" if i == e.output else "")
                     for i, n in enumerate(e.layers) if n or i == e.output)


def place(model: ModelShape, devices: Sequence[Device], *, mode: str = "auto",
          explicit: Sequence[float] | None = None, k: int = 8,
          objective: str = "token") -> Placement:
    """The split for ``model`` over ``devices`` (``--rpc`` order).

    ``mode``: ``auto`` minimises the predicted ms per token (``objective="verify"``: per verify
    of ``k`` tokens) when every device is measured, else falls back to memory-proportional with
    the reason; ``memory`` is memory-proportional; ``explicit`` evaluates ``explicit``.
    Raises :class:`PlacementError` when the weights and KV cache fit on no set of devices
    (speed mode) or when the input is inconsistent.
    """
    if mode not in MODES:
        raise PlacementError(f"unknown split mode {mode!r}; use one of {', '.join(MODES)} "
                             "(or a list of numbers)")
    if not devices:
        raise PlacementError("no RPC worker devices to place the model on")
    if model.n_layer < 1:
        raise PlacementError("the model has no layers")
    if objective not in ("token", "verify"):
        raise PlacementError(f"unknown objective {objective!r}; token or verify")
    names = tuple(d.name for d in devices)
    n = len(devices)
    identity = tuple(range(n))
    mem_split = propose_split([d.free for d in devices])
    mem_layers, mem_out = layers_from_split(mem_split, model.n_layer)
    memory = _estimate(model, devices, mem_layers, mem_out, k)
    need = model.n_layer * (model.layer_bytes + model.kv_layer_bytes) + model.output_bytes
    have = sum(usable(d.free) for d in devices)
    fits = f"need {human_bytes(need)} of {human_bytes(have)} usable"

    if mode == "explicit":
        if explicit is None or len(explicit) != n or any(w < 0 for w in explicit):
            raise PlacementError(f"an explicit split needs {n} non-negative numbers, one per "
                                 f"worker device ({', '.join(names)})")
        layers, out = layers_from_split(explicit, model.n_layer)
        return Placement("explicit", identity, tuple(float(w) for w in explicit),
                         _estimate(model, devices, layers, out, k), memory,
                         f"set by hand; {fits}", names)

    def memory_placement(reason: str) -> Placement:
        return Placement("memory", identity, tuple(mem_split), memory, memory, reason, names)

    if mode == "memory":
        return memory_placement(f"proportional to free memory as asked; {fits}")
    unmeasured = [d.name for d in devices if not d.measured]
    if unmeasured:
        return memory_placement(f"proportional to free memory: no speed measurement for "
                                f"{', '.join(unmeasured)}; {fits}")

    best: tuple[tuple[float, int, tuple[int, ...], int], Estimate] | None = None
    for used in _candidates(devices):
        for output in used:
            filled = _fill(model, devices, used, output, k if objective == "verify" else 0)
            if filled is None:
                continue
            est = _estimate(model, devices, filled, output, k)
            value = est.ms_verify if objective == "verify" else est.ms_token
            # Ties: fewer devices, then earlier devices, then the output on the later one.
            key = (round(float(value or 0.0), 3), len(used), used, -output)
            if best is None or key < best[0]:
                best = (key, est)
    if best is None:
        raise PlacementError(f"the model does not fit: {fits} (weights "
                             f"{human_bytes(model.n_layer * model.layer_bytes)}, KV cache "
                             f"{human_bytes(model.n_layer * model.kv_layer_bytes)}, output "
                             f"{human_bytes(model.output_bytes)}); add a worker, lower the "
                             "context or the slots, or use a smaller quantization")
    chosen = best[1]
    hop = _hop(devices)
    chain = f"; each host after the first adds {hop:.2f} ms (measured over a chain)" if hop else ""
    mem_value, value = ((memory.ms_verify, chosen.ms_verify) if objective == "verify"
                        else (memory.ms_token, chosen.ms_token))
    if mem_value is not None and value is not None and chosen.used == memory.used \
            and (chosen.layers, chosen.output) != (memory.layers, memory.output) \
            and mem_value <= value * (1 + SPEED_MARGIN) \
            and _fits(model, devices, mem_layers, mem_out):
        return memory_placement(
            f"proportional to free memory: the fastest split ({_describe(chosen, names)}) "
            f"uses the same devices and is predicted "
            f"{mem_value / value - 1:.0%} faster, under the {SPEED_MARGIN:.0%} that per-layer "
            f"timings on a busy machine can be off by; {fits}{chain}")
    dropped = [names[i] for i in range(n) if i not in chosen.used]
    why = (f"fastest predicted of every set of devices that fits ({fits})"
           + (f"; left out {', '.join(dropped)} (they add more link and compute time than "
              "they save)" if dropped else "") + chain)
    order = _order(n, chosen.layers, chosen.output)
    return Placement("speed", order, _weights(chosen.layers, chosen.output, order), chosen,
                     memory, why, names)
