"""The context rule (``tightwad.pool.context``): the trained context per slot, capped by memory,
shared by the slots, never below the floor without saying so; and doctor's "slot context" check
on observed facts (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tightwad import defaults
from tightwad.pool import checks as doctor
from tightwad.pool import context, discovery, inventory, rpcproto
from tightwad.pool.gguf_info import GGUFInfo
from tightwad.pool.placement import GiB, MiB, usable

KV_8B = 32 * 8 * 128 * 2 * 2  # Llama 3 8B: layers x KV heads x head dim x (K, V) x f16 = 128 KiB


def _info(trained: int = 131072, size: int = 5 * GiB) -> GGUFInfo:
    """A Llama-3-8B-shaped GGUF's facts (no file: the rule reads only these)."""
    meta = {"general.architecture": "llama", "llama.block_count": 32,
            "llama.embedding_length": 4096, "llama.attention.head_count": 32,
            "llama.attention.head_count_kv": 8}
    if trained:
        meta["llama.context_length"] = trained
    return GGUFInfo(Path("/models/m.gguf"), size, 3, 0, meta)


def test_bytes_per_token_follow_the_gguf() -> None:
    assert _info().kv_cache_bytes(1) == KV_8B
    assert context.trained_context(_info(trained=8192)) == 8192
    assert context.trained_context(_info(trained=0)) == 0


def test_the_trained_context_caps_each_slot() -> None:
    choice = context.choose_ctx_size(8192, 4, KV_8B, 1000 * GiB)
    assert (choice.ctx_size, choice.per_slot, choice.limit) == (4 * 8192, 8192, "trained context")
    assert not choice.warning
    # Memory unknown: no cap but the trained context.
    assert context.choose_ctx_size(8192, 4, KV_8B, None).ctx_size == 4 * 8192


def test_memory_caps_it_in_whole_steps_of_256() -> None:
    memory = 4 * 10_000 * KV_8B
    choice = context.choose_ctx_size(131072, 4, KV_8B, memory)
    assert choice.limit == "memory" and not choice.warning
    assert choice.per_slot == 10_000 // 256 * 256 == 9984
    assert choice.ctx_size == 4 * 9984 and choice.ctx_size * KV_8B <= memory


def test_slots_share_the_memory() -> None:
    memory = 64 * 1024 * KV_8B
    one, two, eight = (context.choose_ctx_size(131072, n, KV_8B, memory) for n in (1, 2, 8))
    assert (one.per_slot, two.per_slot, eight.per_slot) == (65536, 32768, 8192)
    assert one.ctx_size == two.ctx_size == eight.ctx_size == 65536


def test_tiny_memory_gives_the_floor_and_says_so() -> None:
    choice = context.choose_ctx_size(131072, 4, KV_8B, 100 * MiB)
    assert choice.per_slot == defaults.CTX_PER_SLOT_FLOOR == 2048
    assert choice.limit == "floor" and choice.ctx_size == 4 * 2048
    assert "1.0 GiB of KV cache" in choice.warning and "100.0 MiB" in choice.warning
    assert "WARNING" in choice.message
    # A model trained on less than the floor is not pushed past what it learned.
    small = context.choose_ctx_size(1024, 2, KV_8B, 1000 * GiB)
    assert small.per_slot == 1024 and not small.warning
    # Unknown trained context: the floor, without a warning when it fits.
    assert context.choose_ctx_size(0, 4, KV_8B, 1000 * GiB).per_slot == 2048
    with pytest.raises(ValueError, match="slots"):
        context.choose_ctx_size(8192, 0, KV_8B, None)


def test_a_cap_per_slot_bounds_the_drafter() -> None:
    choice = context.choose_ctx_size(131072, 4, KV_8B, 1000 * GiB, cap_per_slot=16384)
    assert (choice.per_slot, choice.limit) == (16384, "cap per slot")
    # Below the floor only because the cap is: no warning (the coordinator's slot is that small).
    assert not context.choose_ctx_size(131072, 4, KV_8B, 1000 * GiB, cap_per_slot=1024).warning


def test_memory_for_the_kv_cache_is_free_memory_less_headroom_and_the_model() -> None:
    free = [24 * GiB, 12 * GiB]
    assert context.kv_memory(free, 5 * GiB) == usable(24 * GiB) + usable(12 * GiB) - 5 * GiB
    assert context.kv_memory([GiB], 5 * GiB) == 0
    choice = context.choose_for_model(_info(), 4, free)
    assert choice == context.choose_ctx_size(131072, 4, KV_8B, context.kv_memory(free, 5 * GiB))
    # (21.6 + 10.8 - 5) GiB over 4 slots of 128 KiB per token: 56115 tokens, in steps of 256.
    assert choice.limit == "memory" and choice.per_slot == 56064


def test_what_counts_as_a_small_slot() -> None:
    assert context.small_slot(1024) == "below 4096 tokens"
    assert context.small_slot(4096) == ""
    assert context.small_slot(16384, 131072) == "below a quarter of the trained 131072"
    assert context.small_slot(32768, 131072) == ""
    assert context.small_slot(2048, 2048) == ""  # all the model was trained on


# --- doctor's "slot context" check ------------------------------------------------------------


def _view(**kw) -> doctor.PoolView:
    return doctor.PoolView(source="lan", workers=[doctor.Endpoint("rig/cuda0", "192.0.2.10",
                                                                  50052)],
                           coordinator=doctor.Endpoint("xeon", "192.0.2.13", 8090), **kw)


def _hello(free: int) -> rpcproto.Hello:
    return rpcproto.Hello("192.0.2.10", 50052, (7, 0, 0), 0.0004, 0.0003,
                          [rpcproto.Device(0, free, free)], 100e6)


def test_doctor_warns_about_the_serving_coordinators_small_slots() -> None:
    facts = doctor.Facts(target=_info(), http={"coordinator": discovery.HttpFinding(
        8090, "llama-server", healthy=True, slots=4, n_ctx=1024)})
    [check] = doctor.check_context(_view(ctx=65536), facts)  # /props wins over the inventory
    assert check.status == doctor.WARN
    assert "1024 tokens per slot x 4 slot(s) (the coordinator's /props" in check.message
    assert "below 4096 tokens" in check.message
    assert "coordinator_ctx_size" in check.fix and "coordinator_parallel" in check.fix
    facts.http["coordinator"] = discovery.HttpFinding(8090, "llama-server", healthy=True,
                                                      slots=4, n_ctx=65536)
    assert doctor.check_context(_view(), facts)[0].status == doctor.OK


def test_doctor_judges_the_inventorys_context() -> None:
    facts = doctor.Facts(target=_info(trained=8192))
    [check] = doctor.check_context(_view(ctx=4096, slots=4), facts)
    assert check.status == doctor.WARN and "1024 tokens per slot" in check.message
    assert doctor.check_context(_view(ctx=32768, slots=4), facts)[0].status == doctor.OK
    facts = doctor.Facts(target=_info(trained=131072))
    [check] = doctor.check_context(_view(ctx=65536, slots=4), facts)
    assert check.status == doctor.WARN and "quarter of the trained 131072" in check.message
    assert doctor.check_context(doctor.PoolView(source="x"), facts) == []


def test_doctor_computes_auto_as_the_deploy_does() -> None:
    facts = doctor.Facts(target=_info(), hellos={"rig/cuda0": _hello(80 * GiB)})
    [check] = doctor.check_context(_view(), facts)  # ctx None: auto
    want = context.choose_for_model(_info(), defaults.SLOTS, [80 * GiB])
    assert check.status == doctor.OK, check
    assert f"{want.per_slot} tokens per slot" in check.message and "auto" in check.message
    # The memory check counts the KV cache auto would allocate.
    memory = {c.name: c for c in doctor.check_memory(_view(coordinator_ram=64 * GiB), facts)}
    assert f"at {want.ctx_size} ctx" in memory["device memory"].message
    # Too little memory: the floor, and the warning says so.
    facts.hellos["rig/cuda0"] = _hello(6 * GiB)
    [check] = doctor.check_context(_view(), facts)
    assert check.status == doctor.WARN and "2048 tokens per slot" in check.message
    assert "may not start" in check.message
    assert doctor.check_context(_view(), doctor.Facts())[0].status == doctor.SKIP


def test_the_inventory_reads_auto_and_refuses_other_words(tmp_path: Path) -> None:
    def load(**coord_vars):
        doc = {"all": {"vars": {"tightwad_model": "/m.gguf"}, "children": {
            "rpc_workers": {"hosts": {"w": {"ansible_host": "10.0.0.1"}}},
            "coordinator": {"hosts": {"c": {"ansible_host": "10.0.0.2", **coord_vars}}}}}}
        path = tmp_path / "inv.yml"
        path.write_text(yaml.safe_dump(doc))
        return inventory.load(path)

    inv, errors = load()
    assert errors == [] and inv.coordinator is not None
    assert inv.coordinator.ctx_size("coordinator_ctx_size") is None  # the default: auto
    inv, errors = load(coordinator_ctx_size=32768)
    assert errors == [] and inv.coordinator is not None
    assert inv.coordinator.ctx_size("coordinator_ctx_size") == 32768
    _, errors = load(coordinator_ctx_size="big")
    assert errors == ["c.coordinator_ctx_size: must be auto or a positive integer"]
