"""The context a llama-server runs with (``-c``, shared by its slots), from the model and memory.

The rule: every slot gets the model's trained context (GGUF ``<arch>.context_length``; more
would only overflow what the model learned, and llama-server caps a slot there anyway), unless
the KV cache of all slots does not fit into the memory left beside the weights; then as much as
fits, in steps of 256 tokens (llama.cpp pads a slot's context to 256). Never below a floor per
slot: below it ordinary chats fail with context errors, so the floor wins and the choice says
that it may not fit. The coordinator and drafter roles' ``*_ctx_size: auto`` runs this rule on
the controller (filter_plugins/tightwad_pool.py); ``doctor`` judges a slot's context with
:func:`small_slot`.

The KV cache costs ``n_layer x n_head_kv x head_dim x 2 (K and V) x 2 bytes`` (f16, llama.cpp's
default cache type) per token (:meth:`GGUFInfo.kv_cache_bytes`); the memory is what the deploy
measured on the workers (or the host's RAM) with :func:`placement.usable`'s headroom, less the
model file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tightwad import defaults
from tightwad.pool.gguf_info import GGUFInfo
from tightwad.pool.placement import human_bytes, usable

ALIGN = 256
"""llama.cpp pads a slot's context to a multiple of 256 tokens."""
FLOOR_PER_SLOT = defaults.CTX_PER_SLOT_FLOOR
SMALL_PER_SLOT = defaults.CTX_PER_SLOT_SMALL


@dataclass(frozen=True)
class ContextChoice:
    ctx_size: int
    """``-c``: the context of all slots together."""
    slots: int
    trained: int
    """The model's trained context per sequence (0: the GGUF does not say)."""
    limit: str
    """What set it: ``trained context``, ``cap per slot``, ``memory`` or ``floor``."""
    warning: str = ""

    @property
    def per_slot(self) -> int:
        return self.ctx_size // self.slots

    @property
    def message(self) -> str:
        trained = f"trained {self.trained}" if self.trained else "trained context unknown"
        return (f"context {self.ctx_size} = {self.slots} slot(s) x {self.per_slot} tokens "
                f"({trained}; set by the {self.limit})"
                + (f"; WARNING: {self.warning}" if self.warning else ""))


def trained_context(info: GGUFInfo) -> int:
    """The model's trained context (``<arch>.context_length``), 0 when the GGUF lacks it."""
    value = info.arch_value("context_length", 0)
    return int(value) if isinstance(value, int) and value > 0 else 0


def kv_memory(free: Sequence[int], model_bytes: int) -> int:
    """Bytes left for the KV cache on devices with ``free`` bytes free once they hold the model
    (each device keeps placement's compute headroom)."""
    return max(0, sum(usable(f) for f in free) - model_bytes)


def choose_ctx_size(trained: int, slots: int, kv_bytes_per_token: int, memory: int | None,
                    floor_per_slot: int = FLOOR_PER_SLOT, cap_per_slot: int = 0) -> ContextChoice:
    """``-c`` for ``slots`` slots: the trained context each (the floor when it is unknown; at
    most ``cap_per_slot`` when that is set: a drafter needs no more than the coordinator's
    slot), capped by ``memory`` bytes of KV cache (None: unknown, no cap), never below the
    floor."""
    if slots < 1:
        raise ValueError(f"slots must be at least 1, not {slots}")
    aim = trained if trained > 0 else floor_per_slot
    per_slot, limit = aim, "trained context" if trained > 0 else "floor"
    if 0 < cap_per_slot < aim:
        aim = per_slot = cap_per_slot
        limit = "cap per slot"
    if memory is not None and kv_bytes_per_token > 0:
        fits = memory // (kv_bytes_per_token * slots) // ALIGN * ALIGN
        if fits < per_slot:
            per_slot, limit = fits, "memory"
    floor = min(floor_per_slot, aim)
    warning = ""
    if per_slot < floor:
        need = kv_bytes_per_token * slots * floor
        warning = (f"{slots} slot(s) x {floor} tokens need {human_bytes(need)} of KV cache but "
                   f"only {human_bytes(memory or 0)} is left beside the model: the server may "
                   "not start; lower the slots (parallel), add memory, or set the context")
        per_slot, limit = floor, "floor"
    return ContextChoice(per_slot * slots, slots, trained, limit, warning)


def choose_for_model(info: GGUFInfo, slots: int, free: Sequence[int] | None,
                     floor_per_slot: int = FLOOR_PER_SLOT, cap_per_slot: int = 0) -> ContextChoice:
    """:func:`choose_ctx_size` for a GGUF on devices (or a host) with ``free`` bytes free
    (None: memory unknown)."""
    memory = None if free is None else kv_memory(free, info.size)
    return choose_ctx_size(trained_context(info), slots, info.kv_cache_bytes(1), memory,
                           floor_per_slot, cap_per_slot)


def small_slot(per_slot: int, trained: int = 0) -> str:
    """Why a slot of ``per_slot`` tokens is small ("" when it is not): below
    :data:`SMALL_PER_SLOT`, or below a quarter of the model's trained context. A model trained
    on less is not judged by more than it learned."""
    if trained > 0 and per_slot >= trained:
        return ""
    if per_slot < SMALL_PER_SLOT:
        return f"below {SMALL_PER_SLOT} tokens"
    if trained > 0 and per_slot < trained // 4:
        return f"below a quarter of the trained {trained}"
    return ""
