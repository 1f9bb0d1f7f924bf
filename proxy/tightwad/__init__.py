"""Tightwad: one OpenAI-compatible endpoint over a pool of mismatched machines."""

__version__ = "0.1.0.dev0"
