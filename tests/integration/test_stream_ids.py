"""Streamed ids (patch 0006-server-stream-every-token.patch).

The proxy streams target-only decoding and extends its context with the ids a stream names, so a
stream must name every generated token. Stock llama-server sends no chunk for a token after which
the text ends inside a UTF-8 character, and the next chunk names only its own token; a stream
that ends inside a character names none of the last ones. Here a grammar makes the target spell a
4-byte character whose whole-character tokens are banned, so it must write it in pieces, and the
stream is held to the same request answered in one piece (``tokens`` lists every id).
"""

from __future__ import annotations

import pytest

from support import tokenize
from tightwad.pool.procs import LlamaServer
from tightwad_dev.clients import stream

pytestmark = pytest.mark.timeout(300)

TEXT = "ab\U0001f999cd\U0001f999"  # a 4-byte character


def _request(server: LlamaServer, n_predict: int) -> dict[str, object]:
    # Tokens that hold the character whole (a piece that is valid UTF-8) are banned.
    banned = {t["id"] for ch in set(TEXT) if ord(ch) > 0x7F
              for t in server.post("/tokenize", {"content": ch, "with_pieces": True})["tokens"]
              if isinstance(t["piece"], str)}
    grammar = 'root ::= "' + TEXT + '"'
    return {"prompt": tokenize(server, "Spell it:"), "n_predict": n_predict, "temperature": 0,
            "grammar": grammar, "logit_bias": [[t, False] for t in sorted(banned)],
            "return_tokens": True, "cache_prompt": False}


def _chunks(server: LlamaServer, body: dict[str, object]) -> list[dict[str, object]]:
    got = stream(server.url, "/completion", body)
    assert got.status == 200, got.body
    return [e for e in got.events if isinstance(e, dict)]


def test_a_stream_names_every_token_also_inside_a_character(procs, models) -> None:
    server = procs.llama_server(models.target, name="stream-ids", slots=1)
    body = _request(server, 32)
    whole = server.post("/completion", body)
    assert whole["content"] == TEXT, whole  # the grammar held
    chunks = _chunks(server, body)
    named = [t for c in chunks for t in c["tokens"]]
    assert named == whole["tokens"]
    # The character came in pieces: a chunk named the token before its last piece as well.
    assert any(len(c["tokens"]) > 1 for c in chunks), [c["tokens"] for c in chunks]
    # Each chunk's count of generated tokens is what the chunks have named so far.
    so_far = 0
    for c in chunks:
        so_far += len(c["tokens"])
        assert c["tokens_predicted"] == so_far, (c, so_far)
    assert "".join(str(c["content"]) for c in chunks) == TEXT


def test_a_stream_that_ends_inside_a_character_names_its_last_tokens(procs, models) -> None:
    server = procs.llama_server(models.target, name="stream-ids-end", slots=1)
    whole = server.post("/completion", _request(server, 32))
    # Cut the generation right after the first piece of the character (a token that is not
    # whole UTF-8 detokenizes to a replacement character).
    first_piece = 1 + next(i for i, t in enumerate(whole["tokens"]) if "\ufffd" in
                           server.post("/detokenize", {"tokens": [t]})["content"])
    body = _request(server, first_piece)
    chunks = _chunks(server, body)
    final = chunks[-1]
    assert final["stop"] is True
    assert [t for c in chunks for t in c["tokens"]] == whole["tokens"][:first_piece]
    assert final["tokens"], "the final chunk names the token no chunk named"
    assert final["tokens_predicted"] == first_piece
