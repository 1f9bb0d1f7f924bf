"""One measured generation: what :mod:`.measure` records and :mod:`.summary` reads."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    @property
    def tok_s(self) -> float:
        return self.tokens / self.elapsed_s
