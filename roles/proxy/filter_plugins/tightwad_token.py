"""``proxy_token | tightwad_token_weakness``: why a proxy token is too weak to guard an open
port ("" when it is fine), by the proxy's own rule (``tightwad.config.token_weakness``), so the
preflight refuses what the proxy itself would refuse, before anything is installed."""

from __future__ import annotations

try:
    from tightwad.config import token_weakness
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "the tightwad package is not importable by the Python that runs Ansible: run "
        "ansible-playbook from the environment tightwad is installed in (scripts/bootstrap's "
        ".venv, or pip install ansible-core next to tightwad)") from exc


def tightwad_token_weakness(token: object) -> str:
    return token_weakness(str(token)) or ""


class FilterModule:
    def filters(self) -> dict:
        return {"tightwad_token_weakness": tightwad_token_weakness}
