"""Pure arithmetic of a pool: the tensor split over devices and who plays which role.

``--tensor-split`` takes one proportion per device, RPC devices first in ``--rpc`` order, then
the coordinator's local devices. llama.cpp gives each device a share of the layers proportional
to its number, so the proposal is proportional to what each device can actually hold: its free
memory minus a headroom for the compute buffers and the KV cache of its layers.

``propose_split`` is the one split rule: ``tightwad init`` writes it into the inventory, and the
coordinator role's ``auto`` split (filter_plugins/tightwad_pool.py) computes it at deploy time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
