"""llama-server's JSON, both ways: request bodies, answers parsed into dataclasses, and the
failure types every call maps to. Pure (no I/O): the async and blocking clients use it, and so
does every other part of tightwad that reads a llama-server answer. The text llama.cpp prints
(``--version``, the ``-lv 4`` load report in a coordinator's log) is parsed here too.

Sampling requests pin the whole chain (``samplers`` plus neutral penalties, DRY, XTC, typical-p,
top-n-sigma and mirostat), so an operator's server flags cannot make the server sample from
another distribution than the one :mod:`tightwad.decoding.sampling` replays.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tightwad.decoding.sampling import SamplingParams
from tightwad.decoding.tokens import Position, TokenLogprob

# The stages tightwad.decoding.sampling replays, in llama.cpp's default order; "dist" is appended by the
# server itself.
SAMPLERS = ("top_k", "top_p", "min_p", "temperature")
_NEUTRAL = {
    "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "dry_multiplier": 0.0, "typical_p": 1.0, "xtc_probability": 0.0, "top_n_sigma": -1.0,
    "mirostat": 0, "dynatemp_range": 0.0, "min_keep": 0, "logit_bias": [],
    "post_sampling_probs": False,
}


class UpstreamFailure(Exception):
    """A llama-server did not give a usable answer. ``server`` names which one."""

    def __init__(self, server: str, message: str) -> None:
        super().__init__(f"{server}: {message}")
        self.server = server
        self.detail = message


class UpstreamDown(UpstreamFailure):
    """Connection refused, reset or dropped: the server is not running or just died."""


class UpstreamTimeout(UpstreamFailure):
    """The server did not answer within the call's deadline."""


class UpstreamError(UpstreamFailure):
    """The server answered with an HTTP error status."""

    def __init__(self, server: str, status: int, message: str) -> None:
        super().__init__(server, f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Timings:
    cache_n: int = 0
    prompt_n: int = 0
    predicted_n: int = 0
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0


@dataclass(frozen=True)
class Completion:
    """A finished ``/completion`` answer."""

    tokens: tuple[int, ...]
    content: str
    stop_type: str
    """``eos`` (an end-of-generation token, included in ``tokens``), ``limit``, ``word``, ``none``."""
    probs: tuple[Position, ...] = ()
    """One entry per generated token (when ``n_probs`` was asked for)."""
    prompt_probs: tuple[Position, ...] = ()
    """One entry per trailing prompt token (``prompt_logprobs``, the verify patch)."""
    has_prompt_probs: bool = False
    """The server returned the ``prompt_probabilities`` field at all (a stock server does not)."""
    id_slot: int = -1
    timings: Timings = Timings()


@dataclass(frozen=True)
class StreamChunk:
    """One streamed piece of a ``/completion`` answer; the last one has ``stop`` set."""

    content: str
    tokens: tuple[int, ...]
    """Ids the chunk names. llama-server sends no chunk for a token after which the text ends
    inside a character, and the next chunk names only its own token: count with
    ``n_predicted``, not with these."""
    stop: bool
    stop_type: str = ""
    n_predicted: int = 0
    """Tokens generated so far (cumulative)."""


@dataclass(frozen=True)
class CompletionRequest:
    """A ``/completion`` call on token ids."""

    prompt: Sequence[int]
    n_predict: int
    sampling: SamplingParams = SamplingParams(temperature=0.0)
    seed: int | None = None
    """The server's own RNG seed (independent of ``sampling.seed``, the proxy's)."""
    n_probs: int = 0
    prompt_logprobs: int = 0
    id_slot: int = -1
    cache_prompt: bool = True
    ignore_eos: bool = False

    def body(self, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": list(self.prompt), "n_predict": self.n_predict,
            "temperature": self.sampling.temperature, "top_k": self.sampling.top_k,
            "top_p": self.sampling.top_p, "min_p": self.sampling.min_p,
            "samplers": list(SAMPLERS), **_NEUTRAL,
            "n_probs": self.n_probs, "id_slot": self.id_slot, "cache_prompt": self.cache_prompt,
            "ignore_eos": self.ignore_eos, "return_tokens": True, "stream": stream,
        }
        if self.seed is not None:
            body["seed"] = self.seed & 0xFFFFFFFF
        if self.prompt_logprobs:  # absent otherwise, so a stock server sees a stock request
            body["prompt_logprobs"] = self.prompt_logprobs
        return body


@dataclass(frozen=True)
class Props:
    """What ``/props`` and ``/v1/models`` tell about a server and its model."""

    total_slots: int
    n_ctx: int
    """Context size of ONE slot."""
    model: str
    bos_token: str
    eos_token: str
    chat_template: str
    build_info: str
    model_path: str = ""
    """The GGUF file the server loaded (its path on the server's host)."""
    n_vocab: int | None = None
    vocab_type: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    modalities: frozenset[str] = frozenset()
    """Input beyond text the model takes (``vision``, ``audio``)."""


def _token(entry: Mapping[str, Any]) -> TokenLogprob:
    return TokenLogprob(id=int(entry["id"]), bytes=bytes(entry.get("bytes") or b""),
                        logprob=float(entry["logprob"]))


def _position(entry: Mapping[str, Any]) -> Position:
    return Position(token=_token(entry),
                    top=tuple(_token(t) for t in entry.get("top_logprobs") or ()))


def _timings(raw: Mapping[str, Any] | None) -> Timings:
    raw = raw or {}
    return Timings(cache_n=int(raw.get("cache_n", 0)), prompt_n=int(raw.get("prompt_n", 0)),
                   predicted_n=int(raw.get("predicted_n", 0)),
                   prompt_ms=float(raw.get("prompt_ms", 0.0)),
                   predicted_ms=float(raw.get("predicted_ms", 0.0)))


def parse_completion(data: Mapping[str, Any]) -> Completion:
    """A ``/completion`` JSON answer (non-streamed, or the final streamed chunk) as a dataclass."""
    prompt_probs = data.get("prompt_probabilities")
    return Completion(
        tokens=tuple(int(t) for t in data.get("tokens") or ()),
        content=str(data.get("content", "")),
        stop_type=str(data.get("stop_type", "none")),
        probs=tuple(_position(p) for p in data.get("completion_probabilities") or ()),
        prompt_probs=tuple(_position(p) for p in prompt_probs or ()),
        has_prompt_probs=prompt_probs is not None,
        id_slot=int(data.get("id_slot", -1)),
        timings=_timings(data.get("timings")),
    )


def error_message(status: int, text: str) -> str:
    try:
        err = json.loads(text).get("error", {})
        return str(err.get("message") or err) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        return text.strip()[:500] or f"status {status}"


def is_key_refusal(data: Any) -> bool:
    """Is ``data`` a llama-server's answer to a request without its API key (``--api-key``):
    ``{"error": {"type": "authentication_error", "code": 401}}``? (The proxy's own refusal
    says ``"code": "invalid_api_key"``.)"""
    err = data.get("error") if isinstance(data, dict) else None
    return isinstance(err, dict) and err.get("type") == "authentication_error" \
        and err.get("code") == 401


def is_props(data: Any) -> bool:
    """Is ``data`` a llama-server's ``/props`` answer (rather than another service's JSON)?"""
    return isinstance(data, dict) and ("total_slots" in data or "build_info" in data)


def parse_props(props: Any, models: Any) -> Props:
    """``/props`` and ``/v1/models`` answers of one server as :class:`Props` (``models`` may be
    None: what only ``/v1/models`` says, e.g. ``n_vocab``, is then missing)."""
    props = props if isinstance(props, dict) else {}
    data = (models.get("data") or [{}])[0] if isinstance(models, dict) else {}
    meta = data.get("meta") or {}
    settings = props.get("default_generation_settings") or {}
    return Props(
        total_slots=int(props.get("total_slots", 1)),
        n_ctx=int(settings.get("n_ctx") or meta.get("n_ctx") or 0),
        model=str(data.get("id") or props.get("model_alias") or props.get("model_path", "")),
        bos_token=str(props.get("bos_token", "")), eos_token=str(props.get("eos_token", "")),
        chat_template=str(props.get("chat_template", "")),
        build_info=str(props.get("build_info", "")),
        model_path=str(props.get("model_path", "")),
        n_vocab=meta.get("n_vocab"), vocab_type=meta.get("vocab_type"), meta=meta,
        modalities=frozenset(k for k, v in (props.get("modalities") or {}).items() if v))


def parse_stream_chunk(data: Mapping[str, Any]) -> StreamChunk:
    """One ``data:`` object of a streamed ``/completion``."""
    return StreamChunk(content=str(data.get("content", "")),
                       tokens=tuple(int(t) for t in data.get("tokens") or ()),
                       stop=bool(data.get("stop")), stop_type=str(data.get("stop_type", "")),
                       n_predicted=int(data.get("tokens_predicted", 0)))


def verify_limit_in(message: str) -> int | None:
    """The limit a patched coordinator names when it refuses a verify longer than its
    ``--verify-max-tokens`` ("prompt_logprobs (33) exceeds the server limit (32), ..."), or None
    when ``message`` is another refusal."""
    marker = "server limit ("
    start = message.find(marker)
    if start < 0:
        return None
    digits = message[start + len(marker):].split(")", 1)[0]
    return int(digits) if digits.isascii() and digits.isdigit() else None


@dataclass(frozen=True)
class Slot:
    """One entry of ``/slots``."""

    id: int
    processing: bool
    """A request is running in this slot."""


def parse_slots(data: Any) -> list[Slot]:
    """A ``/slots`` answer (a list of slot objects) as :class:`Slot` entries; anything that is
    not a slot object is left out."""
    if not isinstance(data, list):
        return []
    return [Slot(id=int(s.get("id", i)), processing=bool(s.get("is_processing")))
            for i, s in enumerate(data) if isinstance(s, dict)]


_BUILD_COMMIT = re.compile(r"-([0-9a-f]{7,40})$")


def parse_build_info(build_info: str | None) -> str | None:
    """The commit in ``/props`` ``build_info`` (``b1-0c1e570`` -> ``0c1e570``), or None."""
    if not build_info:
        return None
    match = _BUILD_COMMIT.search(build_info)
    return match[1] if match else None


class Version(NamedTuple):
    """What a llama.cpp binary's ``--version`` says (None where it does not say)."""

    commit: str | None
    rpc_protocol: str | None
    """``v3.0.0``: only ``ggml-rpc-server`` prints it."""


_VERSION_COMMIT = re.compile(r"commit ([0-9a-f]{7,40}|unknown)")
_RPC_PROTOCOL = re.compile(r"rpc protocol: (v[\d.]+)")


def parse_version(text: str) -> Version:
    """``llama-server --version`` / ``ggml-rpc-server --version`` output (stdout and stderr)."""
    commit, proto = _VERSION_COMMIT.search(text), _RPC_PROTOCOL.search(text)
    return Version(commit[1] if commit else None, proto[1] if proto else None)


class ModelBuffer(NamedTuple):
    """One device's share of the weights in a load report."""

    device: str
    """An RPC worker's endpoint (``127.0.0.1:50052``), or a local buffer (``CPU_Mapped``)."""
    mib: float


_BUFFER = re.compile(r"load_tensors:\s+(?P<dev>\S+?)(?:\[(?P<endpoint>[^\]]+)\])?\s+model buffer "
                     r"size =\s+(?P<mib>[\d.]+) MiB")


def parse_load_report(log: str) -> list[ModelBuffer]:
    """The weights per device from a llama-server log's last load report (``-lv 4`` prints it).

    RPC devices are named by endpoint (``RPC0[127.0.0.1:50052]``); ``CPU_Mapped`` is what
    stays in the coordinator's memory (token embeddings, layers not offloaded).
    """
    found: list[ModelBuffer] = []
    for line in log.splitlines():
        if "load_tensors: loading model tensors" in line:
            found = []  # a reload: only the last report counts
        match = _BUFFER.search(line)
        if match:
            found.append(ModelBuffer(match["endpoint"] or match["dev"], float(match["mib"])))
    return found


class Device(NamedTuple):
    """One GPU ``llama-server --list-devices`` lists (a CPU build lists none)."""

    name: str
    """``CUDA0``, ``Vulkan1``: what ``--device`` takes."""
    total_mib: int
    free_mib: int


# "  CUDA0: NVIDIA GeForce RTX 3060 (12044 MiB, 11800 MiB free)"
_DEVICE = re.compile(r"^\s*([A-Za-z]+\d+):.*\((\d+) MiB, (\d+) MiB free\)\s*$", re.MULTILINE)


def parse_list_devices(text: str) -> list[Device]:
    """``llama-server --list-devices`` output, in the order it lists the devices."""
    return [Device(name, int(total), int(free)) for name, total, free in _DEVICE.findall(text)]


class LoadDevice(NamedTuple):
    """A device a llama-server's last load used, in its order (``--rpc`` order for workers)."""

    name: str
    """``RPC0``, ``CUDA0``."""
    where: str
    """An RPC worker's endpoint (``127.0.0.1:50052``), else the device's description."""
    free_mib: int
    """Free when the load began: the default tensor split is proportional to it."""


class MemoryRow(NamedTuple):
    """One device's row of llama-server's memory breakdown (MiB)."""

    total: int
    free: int
    used: int
    """Weights, context (KV cache) and compute buffers together."""
    model: int
    context: int
    compute: int


# "llama_prepare_model_devices: using device RPC0 (127.0.0.1:50052) (unknown id) - 24151 MiB free"
_USING = re.compile(r"using device (\w+) \(([^)]*)\).* - (\d+) MiB free")
# "common_memory_breakdown_print: |   - RPC0 (127.0.0.1:50052) | 24151 = 24151 + (  10 =  2 + ..."
_BREAKDOWN = re.compile(r"memory_breakdown_print: \|\s+- \w+ \(([^)]*)\)\s*\|\s*(\d+) = (\d+) "
                        r"\+ \(\s*(\d+) =\s*(\d+) \+\s*(\d+) \+\s*(\d+)\)")
_N_LAYER = re.compile(r"print_info: n_layer\s+= (\d+)")
_OFFLOADED = re.compile(r"load_tensors: offloaded (\d+)/(\d+) layers")


def parse_load_devices(log: str) -> list[LoadDevice]:
    """The devices of a llama-server log's last load, in order."""
    found: list[LoadDevice] = []
    fresh = True
    for line in log.splitlines():
        match = _USING.search(line)
        if match is None:
            fresh = fresh or bool(found)
            continue
        if fresh:
            found, fresh = [], False
        found.append(LoadDevice(match[1], match[2], int(match[3])))
    return found


def parse_memory_breakdown(log: str) -> dict[str, MemoryRow]:
    """llama-server's memory breakdown by device (RPC workers by endpoint), the last printed."""
    found: dict[str, MemoryRow] = {}
    for match in _BREAKDOWN.finditer(log):
        found[match[1]] = MemoryRow(*(int(match[i]) for i in range(2, 8)))
    return found


def parse_layer_counts(log: str) -> tuple[int, int] | None:
    """``(n_layer, offloaded)`` of a llama-server log's last load: the repeating layers, and
    how many of the ``n_layer + 1`` (with the output layer) went to devices (``-ngl``)."""
    layers, offloaded = _N_LAYER.findall(log), _OFFLOADED.findall(log)
    if not layers or not offloaded:
        return None
    return int(layers[-1]), int(offloaded[-1][0])


class WorkerDevice(NamedTuple):
    """A device an ``ggml-rpc-server`` serves, as its start-up banner lists it."""

    name: str
    """``CPU``, ``CUDA0``: the backend's device name."""
    description: str
    total_mib: int
    free_mib: int


# "  CPU: AMD Ryzen 7 (15890 MiB, 12000 MiB free)" after "Devices:"
_WORKER_DEVICE = re.compile(r"^\s+(\w+): (.*) \((\d+) MiB, (\d+) MiB free\)\s*$", re.MULTILINE)


def parse_worker_devices(text: str) -> list[WorkerDevice]:
    """The devices in ``ggml-rpc-server``'s start-up banner (its log), last start only."""
    banner = text.rsplit("Starting RPC server", 1)[-1] if "Starting RPC server" in text else ""
    return [WorkerDevice(name, desc, int(total), int(free))
            for name, desc, total, free in _WORKER_DEVICE.findall(banner)]


# -- the OpenAI-compatible endpoints (requests the proxy passes through unspeculated) ---------

OPENAI_DONE = "[DONE]"


def parse_openai_event(line: bytes) -> dict[str, Any] | str | None:
    """One line of a streamed ``/v1/chat/completions`` or ``/v1/completions`` answer: the
    chunk object, :data:`OPENAI_DONE` at the end, None for anything else (blank lines,
    comments). An ``error`` object is returned as the chunk it is."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if data == OPENAI_DONE.encode():
        return OPENAI_DONE
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError(f"a streamed chunk that is not an object: {data[:200]!r}")
    return value


def openai_error(chunk: Mapping[str, Any]) -> tuple[int, str] | None:
    """The status and message of a streamed ``error`` chunk, or None."""
    err = chunk.get("error")
    if err is None:
        return None
    if isinstance(err, dict):
        code = err.get("code")
        return (code if isinstance(code, int) else 500), str(err.get("message") or err)
    return 500, str(err)


def openai_finish(chunk: Mapping[str, Any]) -> str | None:
    """The ``finish_reason`` of an answer or chunk's first choice, if it has one."""
    choices = chunk.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        reason = choices[0].get("finish_reason")
        return str(reason) if reason else None
    return None


def openai_usage(chunk: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(prompt_tokens, completion_tokens)`` where an answer or chunk reports them."""
    use = chunk.get("usage")
    if isinstance(use, dict):
        return int(use.get("prompt_tokens") or 0), int(use.get("completion_tokens") or 0)
    return None


def is_role_only(chunk: Mapping[str, Any]) -> bool:
    """A streamed chat chunk that only opens the assistant's message (no text, no calls)."""
    choices = chunk.get("choices")
    if not (isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], dict)):
        return False
    delta = choices[0].get("delta")
    return (isinstance(delta, dict) and set(delta) <= {"role", "content"}
            and delta.get("content") in (None, "") and not choices[0].get("finish_reason"))
