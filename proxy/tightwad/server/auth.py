"""Bearer-token middleware: every path but ``/health`` needs ``Authorization: Bearer <token>``
when a token is configured. The comparison is constant-time, and the token is never logged or
echoed (aiohttp's access log records the request line, not its headers)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from aiohttp.typedefs import Middleware

from tightwad.server.openai_api import error_body

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/health"})


def _unauthorized(message: str) -> web.Response:
    return web.Response(
        status=401, content_type="application/json",
        text=json.dumps(error_body(message, "authentication_error", None, "invalid_api_key")),
        headers={"WWW-Authenticate": 'Bearer realm="tightwad"'})


def bearer_auth(token: str | None, open_paths: Iterable[str] = OPEN_PATHS) -> Middleware:
    """The middleware; with ``token`` None every request passes."""
    expected = token.encode() if token else None
    public = frozenset(open_paths)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is None or request.path in public:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        given_bytes = given.strip().encode("utf-8", "replace")
        if not header:
            return _unauthorized("missing API key: send 'Authorization: Bearer <token>' "
                                 "(the proxy's auth.token)")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, expected):
            return _unauthorized("invalid API key")
        return await handler(request)

    return middleware
