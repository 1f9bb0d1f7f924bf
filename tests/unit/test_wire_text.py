"""The llama-server parsers the pool tools use (tightwad.llamaserver.wire): /props for
discovery, /slots for swap's drain, build_info and --version for doctor, the -lv 4 load report
for status. Every input is copied from a real run of the pinned build (a 2-worker loopback pool
of the test models); test_proxy_llama.py feeds the same parsers a live server."""

from __future__ import annotations

from tightwad.llamaserver import wire

MODEL = "/var/lib/tightwad/models/tightwad-test-target-ec00009ea2b0.gguf"

# GET /props of the pooled coordinator (-np 2 -c 2048), generation params trimmed.
PROPS = {
    "default_generation_settings": {"params": {"seed": 4294967295, "top_k": 40},
                                    "n_ctx": 1024},
    "total_slots": 2, "model_alias": MODEL, "model_ftype": "F16", "model_path": MODEL,
    "modalities": {"vision": False, "video": False, "audio": False},
    "endpoint_slots": True, "endpoint_props": False, "endpoint_metrics": False, "ui": False,
    "chat_template": "{%- for message in messages -%}...", "bos_token": "<|begin_of_text|>",
    "eos_token": "<|end_of_text|>", "build_info": "b1-0c1e570", "is_sleeping": False,
    "cors_proxy_enabled": False,
}

# GET /slots of a 2-slot server while slot 1 generates (its params trimmed).
SLOTS = [
    {"id": 0, "n_ctx": 1024, "speculative": False, "is_processing": False},
    {"id": 1, "n_ctx": 1024, "speculative": False, "is_processing": True, "id_task": 0,
     "n_prompt_tokens": 0, "n_prompt_tokens_processed": 0, "n_prompt_tokens_cache": 0,
     "params": {"seed": 4294967295, "temperature": 0.8},
     "next_token": [{"has_next_token": True, "has_new_line": False, "n_remain": 400,
                     "n_decoded": 0}]},
]

# The coordinator's log around its load report (llama-server -lv 4 --rpc A,B -ngl 999).
LOAD_LOG = """\
0.01.256.504 I print_info: EOG token             = 128009 '<|eot_id|>'
0.01.256.504 I print_info: max token length      = 256
0.01.258.191 I load_tensors: loading model tensors, this can take a while... (load_mode = mmap)
0.01.311.755 I load_tensors: offloading output layer to GPU
0.01.311.761 I load_tensors: offloading 7 repeating layers to GPU
0.01.311.762 I load_tensors: offloaded 9/9 layers to GPU
0.01.311.770 I load_tensors:   CPU_Mapped model buffer size =    31.31 MiB
0.01.311.771 I load_tensors: RPC0[127.0.0.1:38793] model buffer size =    33.00 MiB
0.01.311.772 I load_tensors: RPC0[127.0.0.1:46029] model buffer size =     2.82 MiB
0.01.449.285 I cmn  common_init_: added <|end_of_text|> logit bias = -inf
0.01.449.493 I llama_context: constructing llama_context
"""


def test_props_alone_as_discovery_reads_them() -> None:
    assert wire.is_props(PROPS)
    assert not wire.is_props({"status": "ok"}) and not wire.is_props(["total_slots"])
    props = wire.parse_props(PROPS, None)
    assert (props.total_slots, props.n_ctx, props.model_path) == (2, 1024, MODEL)
    assert props.build_info == "b1-0c1e570" and props.n_vocab is None
    assert wire.parse_props({}, None).model_path == ""


def test_slots_idle_and_busy() -> None:
    assert wire.parse_slots(SLOTS) == [wire.Slot(0, False), wire.Slot(1, True)]
    assert not any(s.processing for s in wire.parse_slots(SLOTS[:1]))
    # An error object (/slots disabled) or junk entries: no slot to wait for.
    assert wire.parse_slots({"error": {"code": 501}}) == []
    assert wire.parse_slots(["x", {"is_processing": True}]) == [wire.Slot(1, True)]


def test_build_info_commit() -> None:
    assert wire.parse_build_info(PROPS["build_info"]) == "0c1e570"
    assert wire.parse_build_info("b6000-0c1e57098bba0c1e57098bba0c1e57098bba1234") == \
        "0c1e57098bba0c1e57098bba0c1e57098bba1234"
    assert wire.parse_build_info("unknown") is None and wire.parse_build_info(None) is None


def test_version_output_of_both_binaries() -> None:
    server = "version: 0.5.0-dev (build 1, commit 0c1e570)\nbuilt with GNU 12.2.0 for Linux x86_64\n"
    worker = "version: ggml 0.25.3 (commit 0c1e570)\nrpc protocol: v7.0.0\n"
    assert wire.parse_version(server) == ("0c1e570", None)
    assert wire.parse_version(worker) == wire.Version("0c1e570", "v7.0.0")
    assert wire.parse_version("bash: ggml-rpc-server: not found") == (None, None)


def test_load_report_names_workers_by_endpoint_and_keeps_the_last() -> None:
    want = [("CPU_Mapped", 31.31), ("127.0.0.1:38793", 33.0), ("127.0.0.1:46029", 2.82)]
    assert wire.parse_load_report("old junk\n" + LOAD_LOG) == want
    assert wire.parse_load_report(LOAD_LOG)[1].device == "127.0.0.1:38793"
    reloaded = LOAD_LOG + LOAD_LOG.replace("2.82", "5.00")
    assert wire.parse_load_report(reloaded) == [*want[:2], ("127.0.0.1:46029", 5.0)]
    assert wire.parse_load_report("no report yet") == []
