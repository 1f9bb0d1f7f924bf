"""``address | tightwad_inet_addr``: the IPv4 address ggml-rpc-server will bind for ``--host
address``, in dotted-quad form, or "" when it refuses it.

The worker parses its host with the C library's ``inet_addr``, which reads ``0``, ``0.0`` and
``000.0.0.0`` as 0.0.0.0 (every interface), ``10.1`` as 10.0.0.1 and hex or octal parts too,
and knows no IPv6. Python's ``socket.inet_aton`` is that same C function, so the role's guard
sees the address exactly as the worker will."""

from __future__ import annotations

import socket


def tightwad_inet_addr(address: object) -> str:
    text = str(address)
    if not text or any(c.isspace() for c in text) or "\0" in text:
        return ""  # a unit's ExecStart would split it; inet_aton would ignore the rest
    try:
        parsed = socket.inet_ntoa(socket.inet_aton(text))
    except OSError:
        return ""
    # inet_addr's error value: the worker refuses this one.
    return "" if parsed == "255.255.255.255" else parsed


class FilterModule:
    def filters(self) -> dict:
        return {"tightwad_inet_addr": tightwad_inet_addr}
