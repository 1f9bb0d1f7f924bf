"""Speculation statistics: per request, and summed over the proxy's life."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestStats:
    """One generation. ``acceptance`` is llama.cpp's accepted/drafted ratio; ``alpha`` is the
    per-position acceptance estimate (Leviathan's a) the k controller used last."""

    mode: str = "remote"
    speculative: bool = False
    """Drafting was possible when the request started (remote mode, tokenizers match)."""
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    fallbacks: int = 0
    """Rounds that wanted a draft and ran target-only (drafter down, slow, busy or erroring)."""
    tokens: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    queued_seconds: float = 0.0
    elapsed_seconds: float = 0.0
    last_k: int = 0
    alpha: float | None = None

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_round(self) -> float | None:
        return self.tokens / self.rounds if self.rounds else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acceptance": self.acceptance,
                "tokens_per_round": self.tokens_per_round}


@dataclass
class GlobalStats:
    """Everything since the proxy started, plus the acceptance of the last rounds."""

    requests: int = 0
    failed: int = 0
    tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    fallbacks: int = 0
    draft_seconds: float = 0.0
    draft_calls: int = 0
    verify_seconds: float = 0.0
    _recent: deque = field(default_factory=lambda: deque(maxlen=200), repr=False)

    def add_round(self, drafted: int, accepted: int, tokens: int, draft_s: float | None,
                  verify_s: float) -> None:
        self.rounds += 1
        self.tokens += tokens
        self.drafted += drafted
        self.accepted += accepted
        if draft_s is not None:
            self.draft_seconds += draft_s
            self.draft_calls += 1
        self.verify_seconds += verify_s
        if drafted:
            self._recent.append((drafted, accepted))

    def as_dict(self) -> dict[str, Any]:
        recent_d = sum(d for d, _ in self._recent)
        recent_a = sum(a for _, a in self._recent)
        return {
            "requests": self.requests, "failed": self.failed, "tokens": self.tokens,
            "rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
            "fallbacks": self.fallbacks,
            "acceptance": self.accepted / self.drafted if self.drafted else None,
            "recent_acceptance": recent_a / recent_d if recent_d else None,
            "tokens_per_round": self.tokens / self.rounds if self.rounds else None,
            "mean_draft_ms": (1000 * self.draft_seconds / self.draft_calls
                              if self.draft_calls else None),
            "mean_verify_ms": 1000 * self.verify_seconds / self.rounds if self.rounds else None,
        }
