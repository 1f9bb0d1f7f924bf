"""The engine's admission of a request (tightwad.engine.engine.Engine.admit): how many tokens
it may generate (no max_tokens: until the end of the context), and why fewer than asked."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tightwad.config import parse_config
from tightwad.engine.engine import Admission, Engine, Failed
from tightwad.engine.servers import Servers, TargetInfo
from tightwad.llamaserver.wire import Props

N_CTX = 100


class _Target(Servers):
    """Servers whose target is known without asking it."""

    def __init__(self, config: Any, modalities: frozenset[str] = frozenset()) -> None:
        super().__init__(config)
        self.info = TargetInfo(Props(total_slots=1, n_ctx=N_CTX, model="m", bos_token="",
                                     eos_token="", chat_template="", build_info="",
                                     n_vocab=1000, modalities=modalities),
                               frozenset(), 0, "")

    async def target_info(self) -> TargetInfo:
        return self.info


def _admit(prompt_len: int, max_tokens: int | None, inputs: tuple[str, ...] = (),
           **limits: Any) -> Admission | Failed:
    config = parse_config({"limits": limits}, env={})
    engine = Engine(config, servers=_Target(config))
    return asyncio.run(engine.admit(list(range(prompt_len)), max_tokens, inputs))


@pytest.mark.parametrize("prompt_len, max_tokens, limits, expected", [
    (10, None, {}, Admission(90, None, None)),  # until the end of the context
    (10, 20, {}, Admission(20, 20, None)),
    (10, 500, {}, Admission(90, 500, "context")),
    (10, 90, {}, Admission(90, 90, None)),
    (10, 50, {"max_tokens_cap": 30}, Admission(30, 50, "limits.max_tokens_cap")),
    (10, None, {"max_tokens_cap": 30}, Admission(30, None, "limits.max_tokens_cap")),
    (80, None, {"max_tokens_cap": 30}, Admission(20, None, None)),
    (80, 50, {"max_tokens_cap": 30}, Admission(20, 50, "context")),
])
def test_max_tokens_is_what_the_context_and_the_cap_leave(
        prompt_len: int, max_tokens: int | None, limits: dict[str, int],
        expected: Admission) -> None:
    assert _admit(prompt_len, max_tokens, **limits) == expected


def test_a_prompt_that_fills_the_context_or_an_image_to_a_text_model_is_refused() -> None:
    full = _admit(N_CTX, None)
    assert isinstance(full, Failed) and full.code == "context_length_exceeded"
    image = _admit(5, None, ("tools", "image_url"))
    assert isinstance(image, Failed) and image.code == "unsupported_input"
    assert "image_url" in image.message
