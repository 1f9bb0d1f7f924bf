"""Config fuzz (issue 8): whatever the YAML file or the environment holds, loading the proxy's
config gives a valid :class:`~tightwad.config.Config` or ONE line of :class:`ConfigError` naming
the key, never another exception. A config file cut short at any byte (what a non-atomic writer
leaves behind) is refused or read whole, never half-applied silently with a traceback; the
server process turns a bad config into that one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tightwad.config import Config, ConfigError, load_config, parse_config

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SCHEMA: dict[str, list[str]] = {
    section: list(field.annotation.model_fields)  # type: ignore[union-attr]
    for section, field in Config.model_fields.items()}
KEYS = [(section, key) for section, keys in SCHEMA.items() for key in keys]

leaves = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
          | st.floats() | st.text(max_size=30)
          | st.sampled_from(["", " ", "0", "-1", "1e309", "nan", "inf", "http://", "ftp://x",
                             "http://h:99999", "http://h/?q", "remote", "REMOTE", "yes"]))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def _load(data: Any) -> Config | str:
    """The config, or the error line."""
    try:
        return parse_config(data, env={})
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith("config error: "), message
        return message


@FUZZ
@given(key=st.sampled_from(KEYS), value=values)
def test_one_bad_value_names_its_key(key: tuple[str, str], value: Any) -> None:
    section, name = key
    result = _load({section: {name: value}})
    if isinstance(result, str):
        assert name in result, result
    else:  # accepted: the value was (coerced to) a valid one
        assert getattr(result, section) is not None


@FUZZ
@given(data=st.dictionaries(st.sampled_from([*SCHEMA, "bogus"]) | st.text(max_size=6),
                            st.dictionaries(st.sampled_from([k for _, k in KEYS])
                                            | st.text(max_size=6), values, max_size=4)
                            | values, max_size=4))
def test_any_structure_is_a_config_or_one_line(data: dict) -> None:
    _load(data)


@FUZZ
@given(env=st.dictionaries(
    st.sampled_from([f"TIGHTWAD_{s.upper()}__{k.upper()}" for s, k in KEYS]
                    + ["TIGHTWAD___", "TIGHTWAD_X__Y", "TIGHTWAD_LISTEN__", "TIGHTWAD_LISTEN"
                       "__PORT__X", "TIGHTWAD_LISTEN"]),
    st.text(max_size=20), max_size=4))
def test_environment_overrides_are_a_config_or_one_line(env: dict[str, str]) -> None:
    try:
        parse_config({}, env=env)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("config error: ")
        assert any(name in str(exc) for name in env) or any(
            f"{s}.{k}" in str(exc) for s, k in KEYS), str(exc)


GOOD_YAML = yaml.safe_dump({
    "listen": {"host": "127.0.0.1", "port": 8088},
    "auth": {"token": "secret-token-value"},
    "target": {"url": "http://127.0.0.1:8090", "timeout_s": 300, "slots": 2},
    "drafter": {"url": "http://127.0.0.1:8091", "timeout_s": 5, "slots": 2},
    "speculation": {"mode": "remote", "k_min": 1, "k_max": 16, "k_initial": 4},
    "limits": {"max_body_bytes": 1048576, "max_tokens_cap": 4096, "default_max_tokens": 512},
}, sort_keys=False)


def test_a_file_cut_short_anywhere_is_refused_or_whole(tmp_path: Path) -> None:
    path = tmp_path / "tightwad.yaml"
    full = load_config(None, env={})
    outcomes = {"config": 0, "error": 0}
    raw = GOOD_YAML.encode()
    for cut in range(len(raw) + 1):
        path.write_bytes(raw[:cut])
        try:
            config = load_config(path, env={})
        except ConfigError as exc:
            assert "\n" not in str(exc) and "secret-token-value" not in str(exc)
            outcomes["error"] += 1
            continue
        outcomes["config"] += 1
        assert isinstance(config, Config)
        if cut == len(raw):
            assert config.target.slots == 2 and config != full
    assert outcomes["error"] > 0 and outcomes["config"] > 0


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(
    lambda b: b.decode("latin-1")))
def test_any_file_text_is_a_config_or_one_line(tmp_path_factory: pytest.TempPathFactory,
                                               text: str) -> None:
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        load_config(path, env={})
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("config error: ")


@pytest.mark.parametrize("yaml_text, key", [
    ("target:\n  url: ftp://nowhere\n", "target.url"),
    ("limits:\n  max_body_bytes: [1, 2]\n", "limits.max_body_bytes"),
    ("listen:\n  shutdown_grace_s: -1\n", "listen.shutdown_grace_s"),
    ("speculation: {k_min: 8, k_max: 4}\n", "k_max"),
    ("auth:\n  token: {a: b}\n", "auth.token"),
])
def test_the_server_prints_one_line_and_exits_2(tmp_path: Path, yaml_text: str,
                                                key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIGHTWAD_")}
    done = subprocess.run([sys.executable, "-m", "tightwad.server", "--config", str(path)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and key in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
