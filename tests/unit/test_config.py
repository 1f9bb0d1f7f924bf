"""The proxy config: defaults, YAML, environment overrides, one-line errors, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tightwad.config import Config, ConfigError, check_bind_security, load_config, parse_config

TOKEN = "s3cret-token-value-123"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tightwad.yml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith("config error: ")
    error = info.value  # no chained traceback when it is printed
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return message


def test_defaults() -> None:
    config = load_config(None, {})
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8088)
    assert config.auth.token is None and not config.auth.allow_unauthenticated_remote
    assert config.target.url == "http://127.0.0.1:8090"
    assert config.drafter.url == "http://127.0.0.1:8091"
    spec = config.speculation
    assert (spec.mode, spec.k_min, spec.k_max, spec.k_initial, spec.adaptive) == (
        "remote", 1, 16, 4, True)
    assert config.limits.max_body_bytes == 1 << 20 and config.limits.max_tokens_cap is None
    assert config.limits.default_max_tokens is None  # until the end of the context


def test_yaml_file_and_env_override(tmp_path: Path) -> None:
    path = write(tmp_path, """
listen: {host: 0.0.0.0, port: 9100}
target:
  url: http://10.0.0.2:8090/
  slots: 4
speculation: {mode: native, k_max: 8}
""")
    config = load_config(path, {"TIGHTWAD_LISTEN__PORT": "9000",
                                "tightwad_speculation__adaptive": "false",
                                "TIGHTWAD_AUTH__TOKEN": TOKEN,
                                "TIGHTWAD_CACHE": "/elsewhere", "TIGHTWAD_SLOW": "1",
                                "OTHER__THING": "x"})
    assert config.listen.port == 9000            # env wins over the file
    assert config.listen.host == "0.0.0.0"       # the rest of the section stays
    assert config.target.url == "http://10.0.0.2:8090"  # trailing slash dropped
    assert config.target.slots == 4
    assert (config.speculation.mode, config.speculation.k_max) == ("native", 8)
    assert config.speculation.adaptive is False
    assert config.auth.token is not None and config.auth.token.get_secret_value() == TOKEN


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIGHTWAD_LIMITS__DEFAULT_MAX_TOKENS", "77")
    assert load_config().limits.default_max_tokens == 77


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing yet\n"), {}) == Config()


def test_out_of_range_value_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "speculation:\n  k_max: 0\n")
    assert error_of(path, {}) == (
        "config error: speculation.k_max: Input should be greater than or equal to 1")


def test_env_errors_name_the_variable() -> None:
    message = error_of(None, {"TIGHTWAD_LISTEN__PORT": "eighty"})
    assert message.startswith("config error: listen.port (from TIGHTWAD_LISTEN__PORT): ")
    assert "integer" in message and "eighty" not in message


def test_unknown_keys_list_the_known_ones(tmp_path: Path) -> None:
    assert error_of(write(tmp_path, "listen: {prot: 1}\n"), {}) == (
        "config error: listen.prot: unknown key; expected one of: host, port, "
        "shutdown_grace_s, cors_origins, sse_keepalive_s, write_timeout_s, max_connections, "
        "keepalive_timeout_s")
    assert error_of(None, {"TIGHTWAD_LISTN__PORT": "1"}) == (
        "config error: listn (from TIGHTWAD_LISTN__PORT): unknown key; expected one of: "
        "listen, auth, target, drafter, speculation, limits, dashboard")


@pytest.mark.parametrize("yaml_text,expected", [
    ("speculation: {k_initial: 20}", "speculation: k_initial (20) must lie between k_min (1) "
                                     "and k_max (16)"),
    ("speculation: {k_min: 5, k_max: 3}", "speculation: k_min (5) must not exceed k_max (3)"),
    ("speculation: {mode: turbo}", "speculation.mode: Input should be 'remote', 'native' or "
                                   "'off'"),
    ("limits: {max_tokens_cap: 4096, default_max_tokens: 9000}",
     "limits: default_max_tokens (9000) must not exceed max_tokens_cap (4096)"),
    ("target: {url: 'localhost:8090'}", "target.url: expected an http:// or https:// base URL "
                                        "such as http://127.0.0.1:8090"),
    ("drafter: {timeout_s: 0}", "drafter.timeout_s: Input should be greater than 0"),
    ("auth: {token: ''}", "auth.token: must not be empty; leave the key out to run without one"),
    ("listen: 8088", "listen: Input should be a valid dictionary or instance of ListenConfig"),
])
def test_validation_messages(tmp_path: Path, yaml_text: str, expected: str) -> None:
    assert error_of(write(tmp_path, yaml_text + "\n"), {}) == "config error: " + expected


def test_several_errors_stay_on_one_line(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "listen: {port: 0}\ndrafter: {slots: 0}\n"), {})
    assert "listen.port:" in message and "; drafter.slots:" in message


def test_unreadable_or_malformed_files(tmp_path: Path) -> None:
    assert "cannot read" in error_of(tmp_path / "missing.yml", {})
    message = error_of(write(tmp_path, "listen:\n  port: [1\n"), {})
    assert "line " in message
    assert error_of(write(tmp_path, "- listen\n"), {}).endswith(
        "expected a mapping of sections (listen, auth, target, drafter, speculation, limits, "
        "dashboard), got list")


def test_bad_env_shapes() -> None:
    assert "empty key" in error_of(None, {"TIGHTWAD_LISTEN__": "1"})
    assert error_of(None, {"TIGHTWAD_LISTEN__PORT__X": "1", "TIGHTWAD_LISTEN__PORT": "2"}) == (
        "config error: TIGHTWAD_LISTEN__PORT__X: listen.port is a value, not a section")
    assert error_of(None, {"TIGHTWAD_LISTEN__PORT__X": "1", "tightwad_listen__port": "2"}) == (
        "config error: tightwad_listen__port: listen.port is a section; set one of its keys "
        "instead")


def test_secrets_never_show(tmp_path: Path) -> None:
    config = load_config(None, {"TIGHTWAD_AUTH__TOKEN": TOKEN,
                                "TIGHTWAD_TARGET__API_KEY": TOKEN + "-key"})
    for text in (repr(config), str(config), config.model_dump_json(), repr(config.auth)):
        assert TOKEN not in text
    # Nor in an error about them.
    message = error_of(write(tmp_path, f"auth: {{token: {{nested: {TOKEN}}}}}\n"), {})
    assert message.startswith("config error: auth.token: ") and TOKEN not in message


def test_config_is_immutable() -> None:
    config = Config()
    with pytest.raises(ValidationError):
        config.listen.port = 1  # type: ignore[misc]


def test_parse_config_takes_a_mapping() -> None:
    assert parse_config({"drafter": {"slots": 3}}).drafter.slots == 3


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost"])
def test_loopback_needs_no_token(host: str) -> None:
    check_bind_security(parse_config({"listen": {"host": host}}))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "box.lan", ""])
def test_remote_bind_needs_a_token(host: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_bind_security(parse_config({"listen": {"host": host}}))
    message = str(info.value)
    assert message.startswith("config error: listen.host: refusing to serve")
    assert "auth.token" in message and "allow_unauthenticated_remote" in message
    check_bind_security(parse_config({"listen": {"host": host}, "auth": {"token": TOKEN}}))
    check_bind_security(parse_config({"listen": {"host": host},
                                      "auth": {"allow_unauthenticated_remote": True}}))


def test_schema_documents_every_field() -> None:
    schema = Config.model_json_schema()
    for name, section in schema["$defs"].items():
        for field, spec in section["properties"].items():
            assert spec.get("description"), f"{name}.{field} has no description"


def test_dashboard_pool_file_names_a_deployed_pools_description(tmp_path: Path) -> None:
    """``dashboard.pool_file``: the description the proxy role copies next to the proxy (the
    role's proxy.yml sets it); none by default (a local pool's proxy gets its state file)."""
    assert load_config(None, {}).dashboard.pool_file is None
    path = write(tmp_path, "dashboard: {pool_file: /etc/tightwad/proxy-pool.json}\n")
    assert load_config(path, {}).dashboard.pool_file == "/etc/tightwad/proxy-pool.json"
    assert load_config(path, {"TIGHTWAD_DASHBOARD__POOL_FILE": "/srv/pool.json"}) \
        .dashboard.pool_file == "/srv/pool.json"
    assert error_of(write(tmp_path, "dashboard: {pool_file: pool.json}\n"), {}) == (
        "config error: dashboard.pool_file: expected an absolute path such as "
        "/etc/tightwad/proxy-pool.json, or null")
    assert error_of(write(tmp_path, "dashboard: {pool: /x}\n"), {}) == (
        "config error: dashboard.pool: unknown key; expected one of: pool_file")
