"""Security of the proxy (issue 8, proxy side): no off-loopback bind without a token, 401 on
every endpoint but /health for a missing or wrong token (compared in constant time), and no
secret in any log line, even at DEBUG and through upstream failures.

The target is a small plain llama-server that itself wants an API key (``--api-key``), so the
proxy's own upstream secret is exercised too.
"""

from __future__ import annotations

import hmac
import http.client
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tightwad.config import ConfigError, check_bind_security, parse_config
from tightwad.pool.procs import LlamaServer, ProcessGroup
from tightwad_dev.clients import post_json, stream
from tightwad_dev.inproc import ProxyThread, proxy_config
from tightwad_dev.models import ModelSet

pytestmark = pytest.mark.timeout(120)

TOKEN = "tw-Secret-0123456789abcdef"
UPSTREAM_KEY = "llama-Key-fedcba9876543210"
ENDPOINTS = [("POST", "/v1/chat/completions",
              {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
             ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
             ("GET", "/v1/models", None),
             ("GET", "/tightwad/status", None),
             ("GET", "/metrics", None),
             ("GET", "/no/such/route", None)]
BAD_AUTH: list[dict[str, str]] = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": f"Bearer {TOKEN.upper()}"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
    {"Authorization": "Bearer \u00e9t\u00e9"},
    {"X-Api-Key": TOKEN},
]


@pytest.fixture(scope="module")
def keyed_target(bin_dir: Path, models: ModelSet,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """A plain llama-server that wants ``UPSTREAM_KEY``."""
    with ProcessGroup(bin_dir=bin_dir, log_dir=tmp_path_factory.mktemp("logs-sec")) as group:
        server = group.llama_server(models.draft, name="keyed-target", slots=2, wait=False,
                                    args=["--api-key", UPSTREAM_KEY])
        group.wait_healthy(server)  # /health needs no key
        yield server


def _raw(url_port: int, method: str, path: str, body: Any,
         headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", url_port, timeout=30)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, data, {"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_every_endpoint_needs_the_token_compared_in_constant_time(
        keyed_target: LlamaServer, make_proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy: ProxyThread = make_proxy(proxy_config(
        keyed_target, None, auth={"token": TOKEN}, target={"api_key": UPSTREAM_KEY},
        speculation={"mode": "off"}))
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for method, path, body in ENDPOINTS:
        for headers in BAD_AUTH:
            status, got, raw = _raw(proxy.port, method, path, body, headers)
            assert status == 401, (method, path, headers, raw[:200])
            assert got["www-authenticate"].startswith("Bearer")
            error = json.loads(raw)["error"]
            assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
            assert TOKEN not in raw.decode(errors="replace")
        status, _, raw = _raw(proxy.port, method, path, body,
                              {"Authorization": f"Bearer {TOKEN}"})
        assert status == (404 if path == "/no/such/route" else 200), (path, raw[:300])
        # Lower-case scheme and extra blanks are accepted (RFC 7235: the scheme is
        # case-insensitive).
        assert _raw(proxy.port, method, path, body,
                    {"Authorization": f"bearer   {TOKEN}"})[0] in (200, 404)
    # Every comparison of a presented token went through hmac.compare_digest, on bytes.
    presented = {a for a, _ in compared}
    assert TOKEN.encode() in presented and b"wrong" in presented
    assert all(b == TOKEN.encode() for _, b in compared)
    assert _raw(proxy.port, "GET", "/health", None, {})[0] == 200


def test_secrets_never_reach_the_logs(models: ModelSet, procs: ProcessGroup) -> None:
    """A proxy process at DEBUG: good and bad tokens, streams, errors, a target that goes
    away mid-way: neither its token, nor the upstream key, nor a client's near-miss appears in
    its log (stdout and stderr) or in /tightwad/status."""
    keyed_target = procs.llama_server(models.draft, name="keyed-target", wait=False,
                                      args=["--api-key", UPSTREAM_KEY])
    procs.wait_healthy(keyed_target)
    proxy = procs.tightwad_proxy(target=keyed_target, mode="off", args=["--log-level", "DEBUG"],
                                 env={"TIGHTWAD_AUTH__TOKEN": TOKEN,
                                      "TIGHTWAD_TARGET__API_KEY": UPSTREAM_KEY})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    near_miss = f"{TOKEN}-nearmiss"
    status, _, body = post_json(proxy.url, "/v1/completions",
                                {"prompt": "Hi", "max_tokens": 4, "temperature": 0},
                                headers=auth)
    assert status == 200, body
    result = stream(proxy.url, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
                    headers=auth)
    assert result.done and not result.errors
    assert post_json(proxy.url, "/v1/completions", {"prompt": "Hi"},
                     headers={"Authorization": f"Bearer {near_miss}"})[0] == 401
    assert post_json(proxy.url, "/v1/completions", {"prompt": 5}, headers=auth)[0] == 400
    status_page = _raw(proxy.port, "GET", "/tightwad/status", None, auth)[2].decode()
    assert TOKEN not in status_page and UPSTREAM_KEY not in status_page
    keyed_target.kill()  # upstream failures get logged with their details
    try:
        assert post_json(proxy.url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2},
                         headers=auth)[0] == 503
        assert _raw(proxy.port, "GET", "/v1/models", None, auth)[0] == 503
    finally:
        proxy.stop()
    log = proxy.log_text()
    assert "DEBUG" in log and "/v1/completions" in log, log[-2000:]  # it did log at DEBUG
    for secret in (TOKEN, UPSTREAM_KEY, near_miss, TOKEN[:12]):
        assert secret not in log, f"{secret!r} found in the proxy's log"


@pytest.mark.parametrize("host, token", [("::", None), ("192.0.2.10", "  ")])
def test_off_loopback_bind_without_token_is_refused(host: str, token: str | None) -> None:
    """The server process exits 2 with one line naming auth.token (a blank token is none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIGHTWAD_")}
    env["TIGHTWAD_LISTEN__HOST"] = host
    if token is not None:
        env["TIGHTWAD_AUTH__TOKEN"] = token
    done = subprocess.run([sys.executable, "-m", "tightwad.server"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "auth.token" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "box.lan", "", "127.0.0.1.nip.io"])
def test_bind_rules(host: str) -> None:
    with pytest.raises(ConfigError, match="auth.token"):
        check_bind_security(parse_config({"listen": {"host": host}}))
    check_bind_security(parse_config({"listen": {"host": host}, "auth": {"token": TOKEN}}))
    check_bind_security(parse_config({"listen": {"host": host},
                                      "auth": {"allow_unauthenticated_remote": True}}))
    check_bind_security(parse_config({"listen": {"host": "127.0.0.1"}}))
