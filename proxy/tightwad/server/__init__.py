"""The proxy's aiohttp app: routes, OpenAI wire shapes, SSE, auth and lifecycle.
``python -m tightwad.server`` runs it."""
