"""What every configuration of the pool benchmark shares: prompts, server sizes, k names."""

from __future__ import annotations

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "Once upon a time, in a land far away, there lived",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "The weather today is sunny with a light wind, and",
    "Please write a short story about a robot that learns to cook.",
    "A pool of old machines can serve one large language model when",
    "It is important to measure things before believing them, so",
    "The user asked the assistant a question, and the assistant",
]
VERIFY_MAX_TOKENS = 32
SLOTS = 8
CTX = 8192  # split over SLOTS slots: 1024 each
NATIVE_DEFAULT = "default"
ADAPTIVE = "adaptive"
LEGACY_VERSION = "0.5.4"
DEFAULT_LEGACY_VENV = "~/.cache/tightwad/tightwad-054-venv"
LABELS = {
    "a": "target alone, one server",
    "b": "pool direct",
    "c": "pool + llama.cpp native speculation, draft on the coordinator",
    "c2": "pool + llama.cpp native speculation, draft on a junk host's rpc-server",
    "d": "pool + Tightwad remote draft (this proxy)",
    "e": f"pool + original Tightwad {LEGACY_VERSION} proxy",
}
