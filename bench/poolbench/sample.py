"""One measured generation: what :mod:`.measure` records and :mod:`.summary` reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One measured generation (or, with concurrency > 1, one batch of simultaneous ones)."""

    config: str
    k: str
    prompt: int
    rep: int
    streams: int
    tokens: int
    elapsed_s: float
    ttft_s: float | None
    drafted: int | None
    accepted: int | None
    rounds: int | None
    rpc: dict[str, int]
    draft_link: dict[str, int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
    # Each request's wall time (one entry for one stream; one per stream for a batch).
    latencies_s: list[float] = field(default_factory=list)
    # A batch's steady-state window: from the moment every stream has its first token to the
    # moment the first one ends (seconds, RPC traffic, coordinator batches, tokens, CPU seconds
    # per process role); None when the window was empty (a stream ended before another started).
    window: dict[str, Any] | None = None
    # The proxy's load regimes after a batch (``/tightwad/status``): which ran, at what rates.
    regimes: dict[str, Any] | None = None
    # A batch's streams whose text equals the same configuration's solo text for their prompt.
    solo_same: int | None = None
    solo_different: int | None = None

    @property
    def tok_s(self) -> float:
        return self.tokens / self.elapsed_s
