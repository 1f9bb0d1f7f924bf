"""CORS for browser clients (``listen.cors_origins``): a page from an allowed origin may call
the API. A preflight (``OPTIONS`` with ``Access-Control-Request-Method``) from an allowed origin
is answered here, before the token check (browsers send preflights without credentials); one
from any other origin gets 403. Answers to allowed origins carry the CORS headers, streams
too (they are added when the response is prepared)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from tightwad.server.openai_api import error_body

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
METHODS = "GET, POST, OPTIONS"
MAX_AGE_S = 600


class Cors:
    """The allowed origins (``*``: any), and the middleware and prepare hook that apply them."""

    def __init__(self, origins: Iterable[str], expose: Iterable[str] = ()) -> None:
        self.origins = frozenset(o.rstrip("/") for o in origins)
        self.expose = ", ".join(expose)

    def allows(self, origin: str | None) -> bool:
        return bool(origin) and ("*" in self.origins or origin in self.origins)

    def _headers(self, origin: str) -> dict[str, str]:
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if self.expose:
            headers["Access-Control-Expose-Headers"] = self.expose
        return headers

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "OPTIONS" or \
                "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        origin = request.headers.get("Origin")
        if not self.allows(origin):
            return web.Response(status=403, content_type="application/json", text=json.dumps(
                error_body(f"the origin {origin!r} may not call this API (listen.cors_origins)",
                           "invalid_request_error", None, "origin_not_allowed")))
        assert origin is not None
        asked = request.headers.get("Access-Control-Request-Headers")
        return web.Response(status=204, headers={
            **self._headers(origin), "Access-Control-Allow-Methods": METHODS,
            "Access-Control-Allow-Headers": asked or "Authorization, Content-Type",
            "Access-Control-Max-Age": str(MAX_AGE_S)})

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if self.allows(origin) and "Access-Control-Allow-Origin" not in response.headers:
            assert origin is not None
            response.headers.update(self._headers(origin))
