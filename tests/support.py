"""Helpers the test modules share (conftest.py holds the fixtures)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tightwad.pool import rpcproto
from tightwad.pool.procs import LlamaServer

REPO = Path(__file__).resolve().parents[1]
GiB = 1 << 30


def tightwad_cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 180,
                 cwd: Path | None = REPO, columns: int = 200) -> subprocess.CompletedProcess[str]:
    """The `tightwad` CLI as a user runs it (same code as the console script); ``env`` adds to
    this process's environment."""
    return subprocess.run([sys.executable, "-m", "tightwad.cli", *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "COLUMNS": str(columns), **(env or {})})


def tokenize(server: LlamaServer, text: str, *, parse_special: bool = True) -> list[int]:
    """``text`` as the server tokenizes a prompt (BOS added)."""
    return server.post("/tokenize", {"content": text, "add_special": True,
                                     "parse_special": parse_special})["tokens"]


def target_alone(server: LlamaServer, prompt: list[int], n: int, **extra: Any) -> dict[str, Any]:
    """What the target generates by itself: one plain greedy request, no prompt cache."""
    return server.post("/completion", {
        "prompt": prompt, "n_predict": n, "temperature": 0, "cache_prompt": False,
        "return_tokens": True, **extra}, timeout=300)


class FakeWorker:
    """Answers HELLO (with ``version``) and the device queries like ggml-rpc-server."""

    def __init__(self, version: tuple[int, int, int] = (7, 0, 0),
                 devices: tuple[tuple[int, int], ...] = ((3 * GiB, 4 * GiB),)) -> None:
        self.version, self.devices = version, devices
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _recv(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError
            data += chunk
        return data

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    while True:
                        cmd = self._recv(conn, 1)[0]
                        size = struct.unpack("<Q", self._recv(conn, 8))[0]
                        payload = self._recv(conn, size)
                        if cmd == rpcproto.CMD_HELLO:
                            out = bytes([*self.version, 0]) + bytes(rpcproto.CONN_CAPS_SIZE)
                        elif cmd == rpcproto.CMD_DEVICE_COUNT:
                            out = struct.pack("<I", len(self.devices))
                        elif cmd == rpcproto.CMD_GET_DEVICE_MEMORY:
                            out = struct.pack("<QQ", *self.devices[struct.unpack("<I",
                                                                                 payload)[0]])
                        else:
                            break
                        conn.sendall(struct.pack("<Q", len(out)) + out)
                except (ConnectionError, OSError):
                    pass

    def close(self) -> None:
        self.sock.close()


def tiny_gguf(path: Path, n_layer: int = 8, n_embd: int = 256, n_vocab: int = 512,
              n_ff: int | None = None, dtype: str = "float16") -> Path:
    """A GGUF with the shape placement and the probe read (metadata, embeddings, two tensors per
    block, the output matrix; all zeros), nothing a server could run."""
    import gguf
    import numpy as np

    kind = np.dtype(dtype)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(n_layer)
    writer.add_embedding_length(n_embd)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_context_length(4096)
    writer.add_tensor("token_embd.weight", np.zeros((n_vocab, n_embd), kind))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((n_embd, n_embd), kind))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", np.zeros((n_ff or 2 * n_embd, n_embd), kind))
    writer.add_tensor("output.weight", np.zeros((n_vocab, n_embd), kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def http_status(url: str, key: str | None = None, timeout: float = 10) -> int:
    """The HTTP status of a GET, with the bearer ``key`` when given (errors are statuses too)."""
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces): state first,
    then the parent's id; FileNotFoundError once the process is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie nobody reaped has ended)."""
    try:
        return _stat(pid)[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int(_stat(proc.name)[1]) == pid:
                found.append(int(proc.name))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return found
