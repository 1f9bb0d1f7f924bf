"""The set-up promises: `tightwad init` writes a strong proxy token and says how clients connect,
weak tokens are refused off loopback, `tightwad serve` is `python -m tightwad.server`,
`tightwad --version` names the pin, YAML's booleans read as the words the user wrote, and a
build without the package's patches fails instead of going stock."""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import stat
import struct
from pathlib import Path

import pytest
import yaml

from tightwad import __version__, cli
from tightwad import build as llama_build
from tightwad.cli import init as init_cmd
from tightwad.cli import main as cli_main
from tightwad.config import ConfigError, check_bind_security, load_config, parse_config, token_weakness
from tightwad.pool import inventory as inv_mod
from tightwad.server import __main__ as server_main

REPO = Path(__file__).resolve().parents[2]
STRONG = "kq3-Vx8_pL2mZ7rT9wY4"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_gguf(path: Path) -> Path:
    """A valid GGUF header with no tensors and no metadata: enough for init's check."""
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    return path


def run_init(tmp_path: Path, out: Path, *extra: str) -> int:
    closed = str(closed_port())
    return cli_main(["init", "--local", "--yes", "--model", str(tiny_gguf(tmp_path / "m.gguf")),
                     "-o", str(out), "--ssh-port", "0", "--rpc-ports", closed,
                     "--http-ports", closed, "--timeout", "0.2", *extra])


# --- init: the token and how to connect ------------------------------------------------------


def test_init_writes_a_strong_token_and_says_how_to_connect(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "inv.yml"
    assert run_init(tmp_path, out) == 0
    printed = capsys.readouterr().out
    token = yaml.safe_load(out.read_text())["all"]["vars"]["tightwad_proxy_token"]
    assert isinstance(token, str) and len(token) >= 43 and token_weakness(token) is None
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    # The URL of the proxy host (here loopback: --local), where the token is, never the token.
    assert "http://127.0.0.1:8088/v1" in printed
    assert "all.vars.tightwad_proxy_token" in printed and str(out) in printed
    assert token not in printed

    # Written again with --force: the strong token stays (its clients keep working) ...
    assert run_init(tmp_path, out, "--force") == 0
    assert yaml.safe_load(out.read_text())["all"]["vars"]["tightwad_proxy_token"] == token
    assert "kept" in capsys.readouterr().out
    # ... a weak one is replaced.
    doc = yaml.safe_load(out.read_text())
    doc["all"]["vars"]["tightwad_proxy_token"] = "change-me"
    out.write_text(yaml.safe_dump(doc))
    assert run_init(tmp_path, out, "--force") == 0
    fresh = yaml.safe_load(out.read_text())["all"]["vars"]["tightwad_proxy_token"]
    assert fresh not in ("change-me", token) and token_weakness(fresh) is None


def test_two_inits_write_different_tokens(tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "inv.yml", tmp_path / "b" / "inv.yml"
    assert init_cmd.proxy_token(first)[0] != init_cmd.proxy_token(second)[0]
    assert init_cmd.proxy_token(first)[1] is False


def test_proxy_url_is_the_proxy_hosts_pool_address() -> None:
    inv = inv_mod.Inventory()
    inv.add_host("proxy", "xeon", ansible_host="xeon.lan", tightwad_pool_address="192.168.1.13")
    assert init_cmd.proxy_url(inv) == "http://192.168.1.13:8088/v1"
    inv = inv_mod.Inventory()
    inv.add_host("proxy", "v6", ansible_host="fd00::13", proxy_port=9000)
    assert init_cmd.proxy_url(inv) == "http://[fd00::13]:9000/v1"


def test_the_proxy_role_binds_where_init_says_clients_connect() -> None:
    """With a token (init always writes one) the role binds the pool address, the host of the
    URL init prints; without one, loopback."""
    jinja2 = pytest.importorskip("jinja2")
    bind = yaml.safe_load((REPO / "roles/proxy/defaults/main.yml").read_text())[
        "proxy_bind_address"]
    host = {"ansible_host": "192.168.1.13", "tightwad_pool_address": "192.168.1.13"}
    render = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(bind).render
    assert render(**host, proxy_token=STRONG).strip() == "192.168.1.13"
    assert render(**host, proxy_token="").strip() == "127.0.0.1"
    inv = inv_mod.Inventory()
    inv.add_host("proxy", "xeon", **host)
    assert init_cmd.proxy_url(inv) == "http://192.168.1.13:8088/v1"


# --- weak tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["change-me", "CHANGE_ME_PLEASE_NOW", "short-token",
                                   "your-token-goes-here", "aaaaaaaaaaaaaaaaaaaa",
                                   "abababababababababab"])
def test_weak_tokens_are_refused_off_loopback(token: str) -> None:
    assert token_weakness(token)
    config = parse_config({"listen": {"host": "192.168.1.13"}, "auth": {"token": token}})
    with pytest.raises(ConfigError) as info:
        check_bind_security(config)
    message = str(info.value)
    assert message.startswith("config error: auth.token: too weak") and token not in message
    assert "secrets.token_urlsafe" in message
    # On loopback the token guards nothing reachable from elsewhere: not refused.
    check_bind_security(parse_config({"auth": {"token": token}}))


def test_strong_tokens_pass() -> None:
    for token in (STRONG, init_cmd.proxy_token(Path("/nonexistent"))[0]):
        assert token_weakness(token) is None
        check_bind_security(parse_config({"listen": {"host": "0.0.0.0"}, "auth": {"token": token}}))


def test_the_roles_filter_applies_the_same_rule() -> None:
    path = REPO / "filter_plugins/tightwad_pool.py"
    spec = importlib.util.spec_from_file_location("tightwad_pool_filters", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    weakness = module.FilterModule().filters()["tightwad_secret_weakness"]
    assert weakness("change-me") == token_weakness("change-me") != ""
    assert weakness(STRONG) == ""


# --- YAML booleans ---------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["off", "no", "Off", "false"])
def test_mode_off_in_yaml_is_the_word(tmp_path: Path, word: str) -> None:
    path = tmp_path / "proxy.yml"
    path.write_text(f"speculation: {{mode: {word}}}\n")
    assert yaml.safe_load(path.read_text())["speculation"]["mode"] is False  # YAML 1.1
    assert load_config(path, env={}).speculation.mode == "off"


def test_mode_on_is_still_refused_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yml"
    path.write_text("speculation: {mode: on}\n")
    with pytest.raises(ConfigError, match=r"speculation\.mode: Input should be 'remote', "
                                          r"'native' or 'off'"):
        load_config(path, env={})
    assert load_config(path, env={"TIGHTWAD_SPECULATION__MODE": "off"}).speculation.mode == "off"


# --- serve and --version ---------------------------------------------------------------------


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def test_serve_takes_the_servers_options() -> None:
    commands = next(a for a in cli._parser()._actions
                    if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    assert _options(serve) == _options(server_main.parser()) >= {"--config", "--check"}


def test_serve_checks_a_config_like_the_server(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yml"
    good.write_text(yaml.safe_dump({"listen": {"host": "0.0.0.0"}, "auth": {"token": STRONG}}))
    assert cli_main(["serve", "--check", "--config", str(good)]) == 0
    weak = tmp_path / "weak.yml"
    weak.write_text(yaml.safe_dump({"listen": {"host": "0.0.0.0"}, "auth": {"token": "change-me"}}))
    assert cli_main(["serve", "--check", "-c", str(weak)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "auth.token: too weak" in err and "change-me" not in err


def test_version_names_the_package_and_the_pin(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli_main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == (
        f"tightwad {__version__} (llama.cpp {llama_build.PIN_COMMIT})")


# --- the build needs the package's patches ---------------------------------------------------


def test_the_package_holds_its_patches() -> None:
    patches_dir = llama_build.default_patches_dir()
    assert patches_dir == Path(llama_build.__file__).resolve().parent / "patches" / "llama.cpp"
    names = [p.name for p in llama_build.required_patches(patches_dir)]
    assert names == sorted(names) and names[0].startswith("0001-")


def test_a_build_without_its_patches_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "patches" / "llama.cpp"
    empty.mkdir(parents=True)
    monkeypatch.setattr(llama_build, "default_patches_dir", lambda: empty)
    cache = tmp_path / "cache"
    for command in ("build", "path"):
        assert llama_build.main(["--cache", str(cache), command]) == 2
        assert "no llama.cpp patches" in capsys.readouterr().err
    with pytest.raises(llama_build.BuildError, match="--no-patches"):
        llama_build.ensure_build("cpu", cache=cache)
    with pytest.raises(llama_build.BuildError, match="no llama.cpp patches"):
        llama_build.build_key("cpu")
    # An explicit --patches without any is refused too: only --no-patches builds stock.
    assert llama_build.main(["--cache", str(cache), "path", "--patches", str(empty)]) == 2
    assert llama_build.main(["--cache", str(cache), "path", "--no-patches"]) == 1  # not cached
    assert not os.path.exists(cache / "builds")
