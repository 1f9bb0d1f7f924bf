"""The processes one configuration needs besides the pool's workers: coordinators, the
Tightwad proxy, the original 0.5.4 proxy in its own virtualenv, and llama.cpp's defaults."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tightwad import defaults
from tightwad.pool import localpool
from tightwad.pool.procs import HttpService, LlamaServer, ProcessGroup, free_port

from .http import get_json
from .settings import ADAPTIVE, CTX, LEGACY_VERSION, NATIVE_DEFAULT, SLOTS, VERIFY_MAX_TOKENS


@contextlib.contextmanager
def stopping(proc: Any) -> Iterator[Any]:
    try:
        yield proc
    finally:
        proc.stop()


def pool_args() -> list[str]:
    """What every llama-server of the benchmark runs with, as a deployed one does:
    :meth:`ProcessGroup.llama_server` adds ``tightwad.defaults.LLAMA_SERVER_ARGS`` itself; this
    names them for the report."""
    return list(defaults.LLAMA_SERVER_ARGS)


def coordinator_args() -> list[str]:
    """What the product's coordinator runs with (:func:`tightwad.pool.localpool.coordinator_args`),
    plus ``--metrics`` for the round profile (``llamacpp:n_decode_total``)."""
    return [*localpool.coordinator_args(VERIFY_MAX_TOKENS), "--metrics"]


def drafter_args() -> list[str]:
    """The verify limit: the agreement probe scores draft positions through the verify API.
    (The product's drafter needs no flags of its own; the pool settings come with
    ProcessGroup.llama_server.)"""
    return ["--verify-max-tokens", str(VERIFY_MAX_TOKENS)]


def start_coordinator(group: ProcessGroup, model: Path, rpc: Sequence[str], name: str,
                      extra: Sequence[str] = (), peers: Mapping[str, str] | None = None
                      ) -> LlamaServer:
    """A pooled coordinator; ``peers``: worker endpoint -> peer endpoint (worker to worker)."""
    return group.llama_server(model, name=name, rpc=rpc, ctx=CTX, slots=SLOTS, timeout=900,
                              args=[*coordinator_args(), *extra], peers=peers)


def native_spec_args(config: str, k: str, draft: Path, n_workers: int) -> tuple[list[str], bool]:
    """llama-server's arguments for native speculation (c: draft on the coordinator's CPU;
    c2: on the junk host's rpc-server, after the pool's); whether the junk host joins."""
    extra = ["--spec-type", "draft-simple", "--spec-draft-model", str(draft),
             "--spec-draft-p-min", "0"]
    if k != NATIVE_DEFAULT:
        extra += ["--spec-draft-n-max", k]
    if config == "c":
        return extra + ["--spec-draft-device", "none"], False
    return extra + ["--spec-draft-device", f"RPC{n_workers}", "--spec-draft-ngl", "all",
                    "--tensor-split", ",".join(["1"] * n_workers + ["0"])], True


def start_proxy(group: ProcessGroup, coordinator: LlamaServer, drafter_url: str,
                k: str, k_max: int) -> HttpService:
    if k == ADAPTIVE:
        spec = {"K_MIN": "1", "K_MAX": str(k_max), "K_INITIAL": str(min(4, k_max)),
                "ADAPTIVE": "true"}
    else:
        spec = {"K_MIN": k, "K_MAX": k, "K_INITIAL": k, "ADAPTIVE": "false"}
    env = {"TIGHTWAD_DRAFTER__URL": drafter_url, "TIGHTWAD_DRAFTER__TIMEOUT_S": "30",
           "TIGHTWAD_LIMITS__DEFAULT_MAX_TOKENS": "4096",
           **{f"TIGHTWAD_SPECULATION__{key}": value for key, value in spec.items()}}
    proxy = group.tightwad_proxy(target=coordinator, mode="remote", slots=SLOTS,
                                 name=f"proxy-k{k}", env=env, timeout=120)
    deadline = time.monotonic() + 60
    while not (status := get_json(proxy.url, "/tightwad/status")).get("speculation_active"):
        if time.monotonic() > deadline:
            proxy.stop()
            raise RuntimeError(f"the proxy does not speculate: {json.dumps(status)[:800]}")
        time.sleep(0.2)
    return proxy


def start_legacy(group: ProcessGroup, venv: Path, coordinator: LlamaServer,
                 drafter_url: str, home: Path) -> HttpService:
    port = free_port()
    code = ("import uvicorn\n"
            "from tightwad.config import load_proxy_from_env\n"
            "from tightwad.proxy import create_app\n"
            "c = load_proxy_from_env()\n"
            "uvicorn.run(create_app(c), host=c.host, port=c.port, log_level='warning')\n")
    env = {"TIGHTWAD_DRAFT_URL": drafter_url, "TIGHTWAD_TARGET_URL": coordinator.url,
           "TIGHTWAD_DRAFT_BACKEND": "llamacpp", "TIGHTWAD_TARGET_BACKEND": "llamacpp",
           "TIGHTWAD_HOST": "127.0.0.1", "TIGHTWAD_PORT": str(port), "HOME": str(home),
           "TIGHTWAD_CHAT_TEMPLATE": "chatml", "VIRTUAL_ENV": str(venv), "PYTHONPATH": ""}
    proxy: HttpService = group._spawn(HttpService, "legacy-proxy",
                                      [str(venv / "bin" / "python"), "-c", code], env, port=port)
    deadline = time.monotonic() + 120
    while True:
        with contextlib.suppress(OSError, RuntimeError):
            get_json(proxy.url, "/v1/models", timeout=5)
            return proxy
        if not proxy.alive():
            raise proxy.fail(f"exited with code {proxy.popen.returncode}")
        if time.monotonic() > deadline:
            raise proxy.fail("did not answer within 120 s")
        time.sleep(0.2)


def legacy_venv(path: Path, install: bool) -> tuple[Path | None, str]:
    """The 0.5.4 virtualenv, created with pip when asked; (None, why) when unavailable."""
    python = path / "bin" / "python"
    check = [str(python), "-c", "import tightwad.proxy, uvicorn; from importlib.metadata "
             "import version; print(version('tightwad'))"]
    if python.exists():
        res = subprocess.run(check, capture_output=True, text=True, timeout=120)
        if res.returncode == 0 and res.stdout.strip() == LEGACY_VERSION:
            return path, ""
    if not install:
        return None, (f"no tightwad {LEGACY_VERSION} virtualenv at {path}; pass "
                      "--install-legacy to create it with pip")
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(path / "bin" / "pip"), "install", "-q",
                    f"tightwad=={LEGACY_VERSION}"], check=True)
    return path, ""


def native_default_k(bin_dir: Path) -> int | None:
    """llama.cpp's default --spec-draft-n-max, read from its --help."""
    res = subprocess.run([str(bin_dir / "llama-server"), "--help"], capture_output=True,
                         text=True, timeout=60)
    lines = (res.stdout + res.stderr).splitlines()
    for idx, line in enumerate(lines):
        if "--spec-draft-n-max" in line:
            text = " ".join(lines[idx:idx + 3])
            if "default:" in text:
                value = text.split("default:", 1)[1].split(")", 1)[0].strip()
                if value.isdigit():
                    return int(value)
    return None
