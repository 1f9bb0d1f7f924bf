"""What every configuration of the pool benchmark shares: prompts, server sizes, k names."""

from __future__ import annotations

from typing import Any

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "Once upon a time, in a land far away, there lived",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "The weather today is sunny with a light wind, and",
    "Please write a short story about a robot that learns to cook.",
    "A pool of old machines can serve one large language model when",
    "It is important to measure things before believing them, so",
    "The user asked the assistant a question, and the assistant",
    "In the morning the market opens early, and the first customers",
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):",
    "The history of computing begins long before electronic machines, with",
    "Here is a list of things to pack for a week in the mountains:",
    "When the network is slow, every round trip between two machines",
    "Dear team, thank you for your work this quarter. I would like to",
    "The recipe needs flour, water, salt and yeast. First, mix",
    "SELECT name, count(*) FROM orders WHERE",
    "A good benchmark compares configurations under the same conditions, so",
    "The train left the station at noon, and by the evening it had",
    "To install the package, open a terminal and type",
    "The scientist looked at the results of the experiment and said",
]
# The issues' targets ask for greedy identity over >= 20 prompts.
IDENTITY_PROMPTS = 20
VERIFY_MAX_TOKENS = 32
SLOTS = 16
CTX = 16384  # split over SLOTS slots: 1024 each
NATIVE_DEFAULT = "default"
ADAPTIVE = "adaptive"
LEGACY_VERSION = "0.5.4"
DEFAULT_LEGACY_VENV = "~/.cache/tightwad/tightwad-054-venv"
# The full run's settings (the command line's defaults); a report from other settings says it
# comes from a reduced run and gives the full command.
FULL_RUN: dict[str, Any] = {"tokens": 256, "prompts": 4, "reps": 3, "ks": [1, 2, 4, 8, 16, 32],
            "concurrency": [1, 4, 8, 16], "workers": 4}
# Concurrency levels run for these configurations, at these draft lengths.
CONCURRENCY_UNITS = (("b", "-"), ("c", "default"), ("d", "adaptive"))
# A warm-up batch of the same number of streams before each measured one (graph shapes warm),
# shorter than a measured request.
WARMUP_TOKENS = 32
LABELS = {
    "a": "target alone, one server",
    "b": "pool direct",
    "c": "pool + llama.cpp native speculation, draft on the coordinator",
    "c2": "pool + llama.cpp native speculation, draft on a junk host's rpc-server",
    "d": "pool + Tightwad remote draft (this proxy)",
    "e": f"pool + original Tightwad {LEGACY_VERSION} proxy",
}
