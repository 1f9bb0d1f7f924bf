"""The proxy's configuration: one YAML file, environment overrides, validated up front.

The Ansible role renders a file of this same schema (``Config.model_json_schema()`` describes
every field). Environment variables override it: ``TIGHTWAD_<SECTION>__<KEY>=value``, one ``__``
per level, any case (``TIGHTWAD_LISTEN__PORT=9000``, ``TIGHTWAD_AUTH__TOKEN=...``). ``TIGHTWAD_``
variables without ``__`` (``TIGHTWAD_CACHE``, ...) belong to other tools and are ignored.

Every problem surfaces as one :class:`ConfigError` line naming the key, e.g.
``config error: speculation.k_max: Input should be greater than or equal to 1``; values are never
echoed back, so a secret in the wrong place does not end up in a log.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from tightwad import defaults

ENV_PREFIX = "TIGHTWAD_"
ENV_NESTING = "__"


class ConfigError(ValueError):
    """A configuration problem, as one line that names the key and what is expected."""


class _Section(BaseModel):
    # Unknown keys are errors (a typo must not silently fall back to a default).
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_url(value: str) -> str:
    value = value.strip().rstrip("/")
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises on a malformed port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname \
            or parts.query or parts.fragment:
        raise ValueError("expected an http:// or https:// base URL such as http://127.0.0.1:8090")
    return value


def _check_secret(value: SecretStr | None) -> SecretStr | None:
    if value is not None and not value.get_secret_value().strip():
        raise ValueError("must not be empty; leave the key out to run without one")
    return value


def _yaml_word(value: Any) -> Any:
    # YAML 1.1 reads an unquoted off/no (on/yes) as a boolean: `mode: off` means the word.
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


class ListenConfig(_Section):
    """Where the proxy serves the OpenAI API."""

    host: str = Field("127.0.0.1", description=(
        "Address to bind. Anything but loopback requires auth.token "
        "(or auth.allow_unauthenticated_remote)."))
    port: int = Field(defaults.PROXY_PORT, ge=1, le=65535,
                      description="TCP port of the OpenAI-compatible API.")
    shutdown_grace_s: float = Field(5.0, ge=0, le=3600, description=(
        "On SIGTERM (a restart), new connections are refused at once and requests in flight "
        "get this long to finish; then each ends cleanly: 503 with Retry-After, or an error "
        "event and [DONE] on a stream."))
    cors_origins: list[str] = Field(default_factory=list, description=(
        "Browser origins allowed to call the API from their pages (CORS), e.g. "
        "[\"http://localhost:3000\"]; \"*\" allows any. A preflight from an allowed origin "
        "passes without the token; other origins get 403. Empty: no CORS headers."))
    sse_keepalive_s: float = Field(defaults.SSE_KEEPALIVE_S, gt=0, le=3600, description=(
        "A stream that waits (queued for a slot, or while the prompt is evaluated) sends an "
        "SSE comment line this often, so idle timeouts of reverse proxies and clients do not "
        "cut it."))
    write_timeout_s: float = Field(defaults.WRITE_TIMEOUT_S, gt=0, le=3600, description=(
        "Longest a write to a client may block: a client that stops reading a stream loses it "
        "after this long, and its coordinator slot is freed for the requests waiting. While a "
        "request waits for a slot, a client that takes nothing for an eighth of this loses it."))
    max_connections: int = Field(defaults.MAX_CONNECTIONS, ge=1, le=1_000_000, description=(
        "Most client connections held open at once; one more gets 503 with Retry-After and is "
        "closed (keep the service's open-file limit above it)."))
    keepalive_timeout_s: float = Field(defaults.KEEPALIVE_TIMEOUT_S, gt=0, le=3600,
                                       description=(
        "An idle client connection is closed after this long; also the longest a new "
        "connection may take to send its request's headers."))


class AuthConfig(_Section):
    """Who may use the proxy."""

    token: SecretStr | None = Field(None, description=(
        "Bearer token clients must send (Authorization: Bearer <token>). Never logged. Off "
        "loopback it must be strong: 16 characters or more, no placeholder such as change-me."))
    allow_unauthenticated_remote: bool = Field(False, description=(
        "Serve on a non-loopback address without a token; only behind a firewall you trust."))

    check_token = field_validator("token")(_check_secret)


class TargetConfig(_Section):
    """The coordinator: the pooled llama-server holding the big model."""

    url: str = Field(f"http://127.0.0.1:{defaults.COORDINATOR_PORT}",
                     description="Base URL of the coordinator.")
    api_key: SecretStr | None = Field(None, description=(
        "Key the coordinator expects (its --api-key), if any. Never logged."))
    timeout_s: float = Field(300.0, gt=0, description=(
        "Longest wait for one answer from the coordinator (a verify, a tokenize, or the gap "
        "between streamed chunks in pass-through); then the request fails with 503."))
    slots: int = Field(1, ge=1, description=(
        "Parallel slots of the coordinator (its -np); the proxy runs at most this many "
        "requests at once and queues the rest."))
    recheck_s: float = Field(5.0, ge=0, description=(
        "At most this long after the last look, a request first asks the coordinator's /props "
        "whether it still serves the same model and build; a swapped model is probed afresh "
        "(end-of-generation ids, verify support, the drafter's tokenizer). 0: every request."))

    check_url = field_validator("url")(_check_url)
    check_api_key = field_validator("api_key")(_check_secret)


class DrafterConfig(_Section):
    """The drafter: a small llama-server with the same tokenizer as the target."""

    url: str = Field(f"http://127.0.0.1:{defaults.DRAFTER_PORT}", description="Base URL of the drafter.")
    api_key: SecretStr | None = Field(None, description="Key the drafter expects, if any.")
    timeout_s: float = Field(5.0, gt=0, description=(
        "Deadline for one draft call; past it the round goes on without a draft (the target "
        "decodes alone), so a slow or dead drafter costs speed, never answers."))
    slots: int = Field(1, ge=1, description="Parallel slots of the drafter (its -np).")

    check_url = field_validator("url")(_check_url)
    check_api_key = field_validator("api_key")(_check_secret)


class SpeculationConfig(_Section):
    """How the proxy speculates."""

    mode: Literal["remote", "native", "off"] = Field("remote", description=(
        "remote: the proxy drafts on the drafter and verifies on the coordinator; native: the "
        "coordinator's own --spec-type draft-simple does it (the proxy passes requests "
        "through); off: plain pass-through."))
    k_min: int = Field(1, ge=1, description="Fewest tokens drafted per round.")
    k_max: int = Field(16, ge=1, le=256, description=(
        "Most tokens drafted per round; the coordinator must accept verify batches of k_max + 1 "
        "outputs."))
    k_initial: int = Field(4, ge=1, description=(
        "Draft length before anything is learned about a drafter/target pair, and always for "
        "seeded sampling requests (their random stream depends on k)."))
    adaptive: bool = Field(True, description=(
        "Choose k each round from measured acceptance and timings, learned across the "
        "requests of a drafter/target pair, and run rounds without a draft where drafting "
        "cannot pay at the current load (else always k_initial, always drafting)."))
    k_margin: float = Field(0.1, ge=0, le=1, description=(
        "Hysteresis: k moves to another bucket (1, 2, 4, 8, ...), and paused drafting resumes, "
        "only when predicted tokens/s beat the current choice by this fraction."))
    probe_every: int = Field(16, ge=0, description=(
        "While drafting is paused, every Nth round drafts anyway (load falls, estimates go "
        "stale), doubling N after each probe that drafted and left it paused (up to 8N); while "
        "target-only speed at the current load is unmeasured or close to drafting's, every "
        "Nth round goes without a draft to measure it. 0: never."))
    n_probs: int = Field(40, ge=1, le=1024, description=(
        "Top log-probabilities requested per position when sampling (temperature > 0). The "
        "proxy's sampling is exact when the top-k/top-p/min-p cut falls inside them, always when "
        "top_k <= n_probs; else it asks for more or lets the target sample. Larger costs "
        "bandwidth per verify."))
    gather_ms: float = Field(defaults.VERIFY_GATHER_MS, ge=0, le=1000, description=(
        "With several requests at once, a ready verify waits for the other requests' next "
        "verifies, at most this long past the moment the coordinator is free (and never longer "
        "than a verify takes), and all go in one call that the coordinator evaluates in one "
        "batch instead of one each; 0: off."))

    overlap: bool = Field(defaults.OVERLAP_DRAFTING, description=(
        "While the coordinator verifies a draft, the drafter continues it; when the verify "
        "accepts it all and the target's next token is the continuation's first, the next "
        "round's draft is ready without waiting for the drafter. The output is the same either "
        "way; false: the drafter waits for each verify."))

    mode_word = field_validator("mode", mode="before")(_yaml_word)

    @model_validator(mode="after")
    def _k_order(self) -> SpeculationConfig:
        if not self.k_min <= self.k_max:
            raise ValueError(f"k_min ({self.k_min}) must not exceed k_max ({self.k_max})")
        if not self.k_min <= self.k_initial <= self.k_max:
            raise ValueError(f"k_initial ({self.k_initial}) must lie between k_min "
                             f"({self.k_min}) and k_max ({self.k_max})")
        return self


class LimitsConfig(_Section):
    """What a single request may ask of the pool."""

    max_body_bytes: int = Field(1 << 20, ge=1024, description=(
        "Largest request body accepted (bytes); larger ones get 413."))
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description=(
        "Longest time a client may take to send its request body; a slower one (a stalled or "
        "slowloris client) gets 408 and its connection is closed."))
    max_tokens_cap: int | None = Field(None, ge=1, description=(
        "Upper bound on a request's max_tokens; larger requests are clamped to it and the "
        "answer says so (header X-Tightwad-Max-Tokens-Clamped). None: the context is the "
        "only bound."))
    default_max_tokens: int | None = Field(None, ge=1, description=(
        "max_tokens for a request that does not say. None: until the end of the context."))
    max_stop_strings: int = Field(defaults.MAX_STOP_STRINGS, ge=1, le=1024, description=(
        "Most stop strings one request may give; more get 400."))
    max_stop_chars: int = Field(defaults.MAX_STOP_CHARS, ge=1, le=1_000_000, description=(
        "Longest stop string, in characters; longer get 400."))
    max_queued: int = Field(defaults.MAX_QUEUED, ge=0, description=(
        "Most requests waiting for a coordinator slot; one more gets 429 with Retry-After at "
        "once. 0: no queue (a request that finds every slot busy gets 429)."))
    queue_timeout_s: float = Field(defaults.QUEUE_TIMEOUT_S, gt=0, description=(
        "Longest a request waits for a coordinator slot; then 503 with Retry-After (an error "
        "event and [DONE] on a stream)."))

    @model_validator(mode="after")
    def _default_within_cap(self) -> LimitsConfig:
        if self.default_max_tokens is not None and self.max_tokens_cap is not None and \
                self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) must not exceed "
                             f"max_tokens_cap ({self.max_tokens_cap})")
        return self


class DashboardConfig(_Section):
    """What the dashboard (``/dashboard``) draws beside the proxy's own numbers."""

    pool_file: str | None = Field(None, description=(
        "A deployed pool's description (JSON the coordinator role writes and the proxy role "
        "copies to the proxy's host): the workers in --rpc order, the applied --tensor-split, "
        "the model's layer count and the deploy-time link measurements, from which the page "
        "draws each worker, its layers and its link. None: no deployed pool (a local pool's "
        "proxy gets its state file from tightwad start --local instead)."))

    @field_validator("pool_file")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not os.path.isabs(value):
            raise ValueError("expected an absolute path such as /etc/tightwad/proxy-pool.json, "
                             "or null")
        return value


class Config(_Section):
    """The whole proxy configuration."""

    listen: ListenConfig = Field(default_factory=ListenConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    target: TargetConfig = Field(default_factory=TargetConfig)
    drafter: DrafterConfig = Field(default_factory=DrafterConfig)
    speculation: SpeculationConfig = Field(default_factory=SpeculationConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)


def _env_overrides(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Nested overrides from ``TIGHTWAD_A__B=v`` variables, and which variable set each key."""
    tree: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    for name in sorted(env):
        if not name.upper().startswith(ENV_PREFIX) or ENV_NESTING not in name:
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX):].split(ENV_NESTING))
        if not all(path):
            raise ConfigError(f"config error: {name}: empty key; write TIGHTWAD_SECTION__KEY, "
                              "e.g. TIGHTWAD_LISTEN__PORT=9000")
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config error: {name}: {'.'.join(path[:-1])} is a value, "
                                  "not a section")
            node = child
        if isinstance(node.get(path[-1]), dict):
            raise ConfigError(f"config error: {name}: {'.'.join(path)} is a section; "
                              "set one of its keys instead")
        node[path[-1]] = env[name]
        origin[path] = name
    return tree, origin


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config error: {path}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config error: {path}:{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path}: expected a mapping of sections "
                          f"({', '.join(Config.model_fields)}), got {type(data).__name__}")
    return data


def _keys_at(loc: tuple[str, ...]) -> list[str]:
    """The keys the schema allows at ``loc`` (a section path)."""
    model: Any = Config
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _describe(exc: ValidationError, origin: Mapping[tuple[str, ...], str]) -> str:
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = tuple(str(part) for part in error["loc"])
        # A key from a hostile file may hold line breaks or control characters: quote it, so
        # the error stays one readable line.
        key = ".".join(p if p.isprintable() else repr(p) for p in loc) or "(top level)"
        # An env variable explains an error at its key or below it; an unknown section set
        # from the environment is reported at the section, above the variable's key.
        unknown = error["type"] == "extra_forbidden"
        source = next((f" (from {var})" for path, var in origin.items()
                       if loc[: len(path)] == path or (unknown and path[: len(loc)] == loc)), "")
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown key; expected one of: {', '.join(_keys_at(loc[:-1]))}"
        lines.append(f"{key}{source}: {message}")
    return "config error: " + "; ".join(line.replace("\n", " ") for line in lines)


def parse_config(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed mapping, with ``TIGHTWAD_*__*`` overrides from ``env``."""
    overrides, origin = _env_overrides(env or {})
    try:
        return Config.model_validate(_merge(dict(data), overrides))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None


def load_config(path: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file at ``path`` (None: defaults only), apply ``env`` (None: os.environ)."""
    data = _read_yaml(Path(path)) if path is not None else {}
    return parse_config(data, os.environ if env is None else env)


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name may resolve anywhere, so it counts as remote


MIN_TOKEN_LENGTH = 16
# Placeholders people leave in place (compared lower-case, without separators).
_PLACEHOLDERS = ("changeme", "replaceme", "yourtoken", "placeholder", "example", "password")


def token_weakness(token: str) -> str | None:
    """Why a bearer token is too weak to guard an open port, or None (never echoes it)."""
    folded = "".join(c for c in token.lower() if c.isalnum())
    if len(token) < MIN_TOKEN_LENGTH:
        return f"shorter than {MIN_TOKEN_LENGTH} characters"
    if any(word in folded for word in _PLACEHOLDERS):
        return "a placeholder such as change-me"
    if len(set(token)) < 8:
        return "fewer than 8 different characters"
    return None


def check_bind_security(config: Config) -> None:
    """Refuse to serve a non-loopback address without a token (unless explicitly allowed) or
    with a weak one (short, or a placeholder such as ``change-me``)."""
    host = config.listen.host
    if _is_loopback(host):
        return
    if config.auth.token is not None:
        weakness = token_weakness(config.auth.token.get_secret_value())
        if weakness is None:
            return
        raise ConfigError(
            f"config error: auth.token: too weak to serve {host or 'all addresses'} "
            f"({weakness}); generate one with python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(32))' (tightwad init writes one)")
    if config.auth.allow_unauthenticated_remote:
        return
    raise ConfigError(
        f"config error: listen.host: refusing to serve {host or 'all addresses'} without a "
        "token; set auth.token (or TIGHTWAD_AUTH__TOKEN), listen on 127.0.0.1, or set "
        "auth.allow_unauthenticated_remote: true if a firewall already guards the port")
