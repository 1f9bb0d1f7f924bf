"""What goes into a generation and what comes out of it: the engine's request and events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from tightwad.decoding.sampling import SamplingParams
from tightwad.engine.telemetry import RequestStats


@dataclass(frozen=True)
class GenerationRequest:
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams(temperature=0.0)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class TextDelta:
    text: str
    tokens: tuple[int, ...]
    """Ids of the tokens consumed since the previous delta (their text may come later). Exact
    in remote mode; in pass-through, llama-server's stream omits some ids (see
    :class:`tightwad.llamaserver.client.StreamChunk`), so count with :attr:`count`."""
    count: int = -1
    """How many tokens were consumed (``len(tokens)`` unless given)."""

    def __post_init__(self) -> None:
        if self.count < 0:
            object.__setattr__(self, "count", len(self.tokens))


@dataclass(frozen=True)
class Finished:
    reason: str
    """``stop`` (end-of-generation token or stop string) or ``length``."""
    prompt_tokens: int
    completion_tokens: int
    stats: RequestStats


@dataclass(frozen=True)
class Failed:
    status: int
    """The HTTP status this failure deserves when no output was sent yet."""
    message: str
    code: str
    retry_after: float | None = None


Event = Union[TextDelta, Finished, Failed]  # noqa: UP007 - a runtime alias; X | Y needs 3.10 objects


@dataclass(frozen=True)
class Forwarded:
    """A chunk (or the whole answer) of the coordinator's own OpenAI endpoint, for a request
    passed through unspeculated: the app sends it on as it is."""

    data: dict
