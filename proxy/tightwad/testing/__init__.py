"""Helpers that run real llama.cpp processes and write small models, for tests and the demo."""
