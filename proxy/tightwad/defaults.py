"""Every default a pool has, in one place: the CLI, the proxy's config, the local pool and the
test harness read them from here, and tests/deploy/test_role_defaults.py holds the Ansible
roles' defaults to the same values (the roles cannot import Python)."""

from __future__ import annotations

from typing import Final

# Ports (docs/architecture.md, "Processes and ports").
PROXY_PORT: Final = 8088
COORDINATOR_PORT: Final = 8090
DRAFTER_PORT: Final = 8091
RPC_PORT: Final = 50052
"""The first RPC worker's port; further workers on one host count up from it."""

RPC_INSTANCES: Final = ({"name": "main", "port": RPC_PORT},)
"""The rpc_worker role's default: a worker host without rpc_worker_instances runs this one."""

LOCAL_WORKER_PORTS: Final = (RPC_PORT, RPC_PORT + 1)
"""The local loopback pool's workers (the demo and ``tightwad start --local``)."""

DISCOVERY_RPC_PORTS: Final = (RPC_PORT, RPC_PORT + 1, RPC_PORT + 2, RPC_PORT + 3)
DISCOVERY_HTTP_PORTS: Final = (8080, PROXY_PORT, COORDINATOR_PORT, DRAFTER_PORT)
"""What ``tightwad init`` probes: 8080 is llama-server's own default port."""

VERIFY_MAX_TOKENS: Final = 32
"""The most prompt tokens one verify may score (the verify patch's ``--verify-max-tokens``):
the proxy's k_max plus the tokens whose bytes are still unknown."""

SLOTS: Final = 4
"""Parallel slots (``-np``) of the coordinator and drafter: requests served at once."""

CTX_SIZE: Final = 4096
"""A deployed coordinator's / drafter's total context (shared by its slots)."""

LOCAL_CTX_SIZE: Final = 2048
"""The local pool's context: its demo models are tiny and its machine small."""
