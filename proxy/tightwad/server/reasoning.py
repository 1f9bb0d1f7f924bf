"""Reasoning text apart from the answer, as llama-server gives it: a thinking model's
``<think>...</think>`` goes to ``reasoning_content``, the rest to ``content``. Pure; fed the
streamed text piece by piece, it never sends a tag, even one split across pieces.

llama-server splits only for templates that know thinking (its template analysis finds the
tags); here: templates that contain both tags. A template that opens the tag in the prompt
itself (``<think>\\n`` at the end of the generation prompt) starts the answer in reasoning,
and, as llama-server parses the generation prompt with the answer, what follows the tag there
(the newline) begins the reasoning.
``reasoning_format: none`` keeps everything in ``content``.
"""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"


def thinking_template(template: str) -> bool:
    """The chat template belongs to a model that thinks in ``<think>`` tags."""
    return OPEN in template and CLOSE in template


def opens_thinking(prompt: str) -> str | None:
    """Where the rendered prompt ends inside an opened ``<think>`` (forced thinking): what
    follows the tag in it; else None."""
    if not prompt.rstrip().endswith(OPEN):
        return None
    return prompt[prompt.rindex(OPEN) + len(OPEN):]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (a tag cut by the stream)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplit:
    """Splits an answer, streamed in pieces, into reasoning and content."""

    def __init__(self, opened: str | None = None) -> None:
        """``opened``: the prompt opened the reasoning, and this followed its tag."""
        self.state = "start" if opened is None else "reasoning"
        self.held = opened or ""

    def push(self, text: str) -> tuple[str, str]:
        """The reasoning and content that may be sent after ``text`` came."""
        self.held += text
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            if self.state == "start":
                stripped = self.held.lstrip()
                if stripped.startswith(OPEN):
                    self.state, self.held = "reasoning", stripped[len(OPEN):]
                    continue
                if OPEN.startswith(stripped):  # empty, blank or a cut tag: wait
                    break
                self.state = "content"
            elif self.state == "reasoning":
                end = self.held.find(CLOSE)
                if end >= 0:
                    reasoning.append(self.held[:end])
                    self.state, self.held = "after", self.held[end + len(CLOSE):]
                    continue
                keep = _partial_suffix(self.held, CLOSE)
                reasoning.append(self.held[:len(self.held) - keep])
                self.held = self.held[len(self.held) - keep:]
                break
            elif self.state == "after":  # the blank between the reasoning and the answer
                self.held = self.held.lstrip()
                if not self.held:
                    break
                self.state = "content"
            else:
                content.append(self.held)
                self.held = ""
                break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """What is still held at the end of the answer."""
        held, self.held = self.held, ""
        if self.state == "reasoning":
            return held, ""
        return "", "" if self.state == "after" else held
