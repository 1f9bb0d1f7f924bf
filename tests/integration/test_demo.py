"""README command (a): the local pool behind the proxy comes up, answers, and leaves nothing behind."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tightwad.pool.procs import LOOPBACK, free_port, tcp_open


def test_demo_serves_until_interrupted(llama, models, cache_dir: Path) -> None:
    ports = [free_port() for _ in range(5)]
    cmd = [sys.executable, "-m", "tightwad.pool.demo", "--cache", str(cache_dir), "--port", str(ports[0]),
           "--coordinator-port", str(ports[1]), "--drafter-port", str(ports[2]),
           "--worker-ports", f"{ports[3]},{ports[4]}"]
    demo = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 180
        assert demo.stdout is not None
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            assert line, "demo exited early:\n" + "".join(lines)
            lines.append(line)
            if "OpenAI-compatible endpoint" in line:
                break
        output = "".join(lines)
        endpoint = re.search(r"endpoint: (http://\S+/v1)", output).group(1)
        assert endpoint == f"http://{LOOPBACK}:{ports[0]}/v1"
        assert re.search(r"completion:\s+'.*' \(16 tokens", output), output
        assert "speculation: remote drafting, active" in output
        assert "link:        direct (loopback" in output  # no emulated link unless asked
        with urllib.request.urlopen(f"{endpoint}/models", timeout=10) as resp:
            assert json.load(resp)["data"][0]["id"]
        assert all(tcp_open(LOOPBACK, p) for p in ports)
    finally:
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, rest
    assert "stopping the pool" in rest
    assert not any(tcp_open(LOOPBACK, p) for p in ports), "the demo left a process listening"
