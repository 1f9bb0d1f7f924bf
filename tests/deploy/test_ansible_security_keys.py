"""The coordinator's and drafter's llama-servers never serve the network without a key: the
llama_server role's checks accept "auto" (a key generated on the host) or a strong key of the
inventory's, refuse a weak one or none off loopback; the key goes by file. The rendered units
and the proxy's config carrying both keys are in test_ansible_services.py; the deploy test
shows the keys and the firewall working."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ansible", reason="ansible-core is not installed")

from support import REPO, http_status

ROLE = REPO / "roles" / "llama_server"
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"

PREFLIGHT = f"""\
- name: Preflight
  hosts: localhost
  gather_facts: false
  vars_files:
    - {ROLE}/defaults/main.yml
    - {ROLE}/vars/main.yml
  vars:
    ansible_facts: {{system: Linux, memtotal_mb: 4096}}
  tasks:
    - name: Run the role's checks
      ansible.builtin.import_tasks: {ROLE}/tasks/preflight.yml
"""


def preflight(tmp_path: Path, **extra: object) -> subprocess.CompletedProcess:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    (tmp_path / "play.yml").write_text(PREFLIGHT)
    (tmp_path / "extra.json").write_text(json.dumps(
        {"llama_server_name": "coordinator", "llama_server_model": str(model),
         "llama_server_bind_address": "10.77.0.13", **extra}))
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
               ANSIBLE_FILTER_PLUGINS=f"{REPO / 'filter_plugins'}:{ROLE / 'filter_plugins'}")
    return subprocess.run(
        [str(PLAYBOOK_BIN), "-i", "localhost,", "-c", "local", str(tmp_path / "play.yml"),
         "-e", f"ansible_python_interpreter={sys.executable}", "-e", f"@{tmp_path / 'extra.json'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_the_default_generates_a_key():
    for role in ("coordinator", "drafter"):
        defaults = yaml.safe_load((REPO / "roles" / role / "defaults" / "main.yml").read_text())
        assert defaults[f"{role}_api_key"] == "auto" and defaults[f"{role}_introspection"] is False
    assert yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())["llama_server_api_key"] == "auto"


@pytest.mark.parametrize("key", ["auto", "a-strong-key-of-the-inventory-0123"])
def test_auto_or_a_strong_key_pass(tmp_path, key):
    result = preflight(tmp_path, llama_server_api_key=key)
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.parametrize("key,why", [
    ("change-me", "shorter than 16 characters"),
    ("change-me-please-now", "a placeholder such as change-me"),
    ("", "none given"),
])
def test_weak_or_missing_keys_are_refused_off_loopback(tmp_path, key, why):
    result = preflight(tmp_path, llama_server_api_key=key)
    assert result.returncode != 0
    assert "its API key (coordinator_api_key) must be auto" in result.stdout, result.stdout[-3000:]
    assert why in result.stdout
    if len(key) > 10:
        assert key not in result.stdout  # the message names the problem, never the key


def test_no_key_is_allowed_on_loopback(tmp_path):
    result = preflight(tmp_path, llama_server_api_key="", llama_server_bind_address="127.0.0.1")
    assert result.returncode == 0, result.stdout[-3000:]


# --- the pinned llama-server and the proxy with keys, for real -----------------------------


def _speculated(proxy_url: str) -> dict:
    import urllib.request

    body = json.dumps({"model": "tightwad", "prompt": "The capital of France is",
                       "max_tokens": 24, "temperature": 0}).encode()
    request = urllib.request.Request(f"{proxy_url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        assert json.load(resp)["usage"]["completion_tokens"] > 0
    with urllib.request.urlopen(f"{proxy_url}/tightwad/status", timeout=10) as resp:
        return json.load(resp)


def test_keys_by_file_and_speculation_with_both_keys(procs, models, tmp_path):
    """The role's flags on the pinned llama-server: the key by file (401 without it, /health
    still public), /slots off. A proxy given both keys speculates; one given only the
    coordinator's (what the proxy role rendered before) gets 401 from the drafter and silently
    decodes alone. `tightwad doctor`'s discovery still recognises a keyed llama-server."""
    import secrets

    from tightwad.pool import discovery, localpool

    keys = {name: secrets.token_urlsafe(32) for name in ("coordinator", "drafter")}
    files = {}
    for name, key in keys.items():
        files[name] = tmp_path / f"{name}.key"
        files[name].write_text(key + "\n")
        files[name].chmod(0o600)
    worker = procs.rpc_worker(name="worker")
    coordinator = procs.llama_server(
        models.target, name="coordinator", rpc=[worker],
        args=[*localpool.coordinator_args(), "--api-key-file", str(files["coordinator"]),
              "--no-slots", "--no-webui"])
    drafter = procs.llama_server(
        models.draft, name="drafter",
        args=["--api-key-file", str(files["drafter"]), "--no-slots", "--no-webui"])
    for name, server in (("coordinator", coordinator), ("drafter", drafter)):
        assert http_status(f"{server.url}/health") == 200
        assert http_status(f"{server.url}/v1/models") == 401 and http_status(f"{server.url}/props") == 401
        assert http_status(f"{server.url}/v1/models", "wrong-key") == 401
        assert http_status(f"{server.url}/props", keys[name]) == 200
        assert http_status(f"{server.url}/slots", keys[name]) not in (200, 401)  # off, not hidden
        host, port = server.url.split("//")[1].rsplit(":", 1)
        found = discovery.identify_http(host, int(port))
        assert found is not None and found.kind == "llama-server" and found.healthy, found

    both = procs.tightwad_proxy(target=coordinator, drafter=drafter, name="proxy-keys", env={
        "TIGHTWAD_TARGET__API_KEY": keys["coordinator"],
        "TIGHTWAD_DRAFTER__API_KEY": keys["drafter"]})
    status = _speculated(both.url)
    assert status["speculation_active"] is True and status["stats"]["drafted"] > 0, status

    target_only = procs.tightwad_proxy(target=coordinator, drafter=drafter, name="proxy-no-drafter-key",
                                       env={"TIGHTWAD_TARGET__API_KEY": keys["coordinator"]})
    status = _speculated(target_only.url)
    assert status["stats"]["drafted"] == 0, status
