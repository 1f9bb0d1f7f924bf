"""The tightwad proxy in-process for tests: served from a background event loop, so tests can
use blocking clients (the official `openai` client, urllib) and still reach the engine object.
Also the check that tells a greedy divergence at a float near-tie from a real one."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

from tightwad import defaults
from tightwad.pool.procs import LlamaServer, free_port

VERIFY_MAX_TOKENS = defaults.VERIFY_MAX_TOKENS
PROXY_SLOTS = defaults.SLOTS


class ProxyThread:
    """A tightwad proxy app served on a free loopback port from a background event loop."""

    def __init__(self, config: Any) -> None:
        from tightwad.server.app import ENGINE, create_app

        self.config = config
        self.app = create_app(config)
        self.engine = self.app[ENGINE]
        self.port = config.listen.port
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tightwad-proxy", daemon=True)
        self._runner: Any = None

    def _run(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self._runner = web.AppRunner(self.app, handler_cancellation=True)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        try:
            self.loop.run_until_complete(start())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._runner.cleanup())
        self.loop.close()

    def start(self) -> ProxyThread:
        self._thread.start()
        self._ready.wait(120)
        if self._error is not None:
            raise self._error
        return self

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 120) -> Any:
        """Run a coroutine on the proxy's loop (e.g. to read engine state) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def status(self) -> dict:
        return self.engine.status()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(60)


def proxy_config(target_server: LlamaServer, drafter_server: LlamaServer | None,
                 **sections: Any) -> Any:
    """A validated proxy config for these servers; ``sections`` (``target={...}``, ...)
    override or extend it."""
    from tightwad.config import parse_config

    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "target": {"url": target_server.url, "slots": PROXY_SLOTS, "timeout_s": 60},
        "drafter": {"url": drafter_server.url if drafter_server else "http://127.0.0.1:9",
                    "slots": PROXY_SLOTS, "timeout_s": 5},
        "speculation": {"mode": "remote", "k_max": 16},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return parse_config(data, env={})


# Greedy output through the proxy equals the target's own, except where batched verification
# flips a near-tie of the target's top two tokens (docs/verify-api.md, Numerics). Each of the two
# log-probabilities may move by tests/test_verify.py's tolerance (1e-2), in opposite directions:
# a gap below twice that can flip (seen: 0.018 on an AMD EPYC host, where 1e-2 was too tight).
NEAR_TIE_TOL = 2e-2


def top_two_gap(server: LlamaServer, context: list[int], a: int,
                b: int | None) -> float | None:
    """|logprob(a) - logprob(b)| after ``context`` when a and b are the target's top two
    (``b`` None: whichever is second to ``a``, or first where ``a`` is second)."""
    res = server.post("/completion", {"prompt": context, "n_predict": 1, "temperature": 0,
                                      "n_probs": 5, "cache_prompt": False})
    top = {t["id"]: t["logprob"] for t in res["completion_probabilities"][0]["top_logprobs"]}
    best = sorted(top, key=lambda t: -top[t])[:2]
    if b is None and a in best:
        b = next(t for t in best if t != a) if len(best) == 2 else None
    if b is None or len(best) < 2 or set(best) != {a, b}:
        return None
    return abs(top[a] - top[b])


def greedy_text_verdict(server: LlamaServer, prompt: list[int], ours: str, ref: dict,
                        tol: float = NEAR_TIE_TOL) -> str:
    """'same', or 'near-tie' when ``ours`` leaves the reference (a plain greedy /completion
    with return_tokens) at a near-tie (top-two gap <= ``tol``); an AssertionError for any
    other divergence."""
    if ours == ref["content"]:
        return "same"
    tokens = ref["tokens"]
    # The reference's token at which the texts part: after the longest token prefix whose
    # text ``ours`` starts with.
    j = 0
    while j < len(tokens):
        text = server.post("/detokenize", {"tokens": tokens[: j + 1]})["content"]
        if not ours.startswith(text.rstrip("\ufffd")):
            break
        j += 1
    assert j < len(tokens), f"the outputs differ only in length: {ours!r} vs {ref['content']!r}"
    res = server.post("/completion", {"prompt": prompt + tokens[:j], "n_predict": 1,
                                      "temperature": 0, "n_probs": 2, "cache_prompt": False})
    top = res["completion_probabilities"][0]["top_logprobs"]
    runner_up = next(t["id"] for t in top if t["id"] != tokens[j])
    gap = top_two_gap(server, prompt + tokens[:j], tokens[j], runner_up)
    assert gap is not None and gap <= tol, (
        f"output diverges from the target's at generated token {j} ({tokens[j]}), which is "
        f"not a near-tie of its top two (gap {gap}): {ours!r} vs {ref['content']!r}")
    return "near-tie"
