"""Workers pass activations to each other (patch 0007-rpc-peer-transfer.patch).

Two 3-worker pools of the 128k-vocabulary test target side by side, identical but for the
peers: in ``peer`` each worker also listens with ``--peer`` and the coordinator names those
endpoints in ``GGML_RPC_PEERS``; ``relay`` is the stock path (the coordinator GETs the hidden
states from one worker and SETs them on the next). Every RPC port and peer port of ``peer`` is
behind a counting relay, so the tests see which link each byte crossed:

- greedy output and a verify's prompt log-probabilities are equal on both pools (the same bytes
  land in the same tensor, in the same order);
- a k = 8 verify moves the hidden states worker to worker (2 boundaries x 9 rows x n_embd x 4
  bytes through the peer links) and no longer through the coordinator's links;
- a worker that cannot reach its peer falls back to the relay, with the same output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import tokenize
from tightwad.pool.gguf_info import read_info
from tightwad.pool.linkemu import LinkStats, RelayThread
from tightwad.pool.procs import LlamaServer, ProcessGroup, free_port
from tightwad_dev.models import ModelSet

ARGS = ["--verify-max-tokens", "32", "--output-top-n", "16"]
PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Once upon a time, in a land far away,"]

pytestmark = pytest.mark.timeout(600)


@dataclass
class Pools:
    peer: LlamaServer
    relay: LlamaServer
    rpc_links: RelayThread  # in front of peer's three RPC ports
    peer_links: RelayThread  # in front of its three peer ports
    n_embd: int

    def moved(self, body: dict) -> tuple[dict, LinkStats, LinkStats]:
        """One ``/completion`` on ``peer``, and the bytes it moved over the coordinator's links
        and over the links between workers."""
        rpc0, peer0 = self.rpc_links.stats(), self.peer_links.stats()
        res = self.peer.post("/completion", body, timeout=300)
        rpc1, peer1 = self.rpc_links.stats(), self.peer_links.stats()
        return (res, sum((a - b for a, b in zip(rpc1, rpc0)), LinkStats()),
                sum((a - b for a, b in zip(peer1, peer0)), LinkStats()))


@pytest.fixture(scope="module")
def pools(bin_dir: Path, models: ModelSet,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    with ProcessGroup(bin_dir=bin_dir, log_dir=tmp_path_factory.mktemp("logs-peer")) as group:
        workers = [group.rpc_worker(name=f"peer-worker{i}", peer=True) for i in range(3)]
        with RelayThread([w.endpoint for w in workers], "none") as rpc_links, \
                RelayThread([w.peer for w in workers], "none") as peer_links:
            peer = group.llama_server(
                models.target, name="peer", rpc=rpc_links.endpoints, args=ARGS, timeout=300,
                peers=dict(zip(rpc_links.endpoints, peer_links.endpoints)))
            relay = group.llama_server(
                models.target, name="relay", args=ARGS, timeout=300,
                rpc=[group.rpc_worker(name=f"relay-worker{i}") for i in range(3)])
            n_embd = read_info(models.target).metadata["llama.embedding_length"]
            yield Pools(peer, relay, rpc_links, peer_links, n_embd)
            group.close()  # before the relays go: a coordinator that loses a worker aborts


def greedy(server: LlamaServer, prompt: list[int], n: int) -> list[int]:
    res = server.post("/completion", {"prompt": prompt, "n_predict": n, "temperature": 0,
                                      "cache_prompt": False, "return_tokens": True,
                                      "ignore_eos": True}, timeout=300)
    return res["tokens"]


def verify_body(prompt: list[int], draft: list[int]) -> dict:
    return {"prompt": prompt + draft, "n_predict": 1, "temperature": 0, "n_probs": 16,
            "prompt_logprobs": len(draft), "cache_prompt": True, "return_tokens": True}


def test_greedy_output_and_verify_logprobs_equal_the_relayed_pool(pools: Pools) -> None:
    for text in PROMPTS:
        prompt = tokenize(pools.peer, text)
        cont = greedy(pools.relay, prompt, 24)
        assert greedy(pools.peer, prompt, 24) == cont, text
        body = verify_body(prompt, cont[:8])
        via_peer = pools.peer.post("/completion", body, timeout=300)
        via_relay = pools.relay.post("/completion", body, timeout=300)
        # the same bytes in the same tensors: equal, not merely close
        assert via_peer["prompt_probabilities"] == via_relay["prompt_probabilities"], text
        assert via_peer["tokens"] == via_relay["tokens"]


def test_a_verify_moves_hidden_states_worker_to_worker(pools: Pools) -> None:
    prompt = tokenize(pools.peer, PROMPTS[0])
    draft = greedy(pools.peer, prompt, 8)
    pools.moved(verify_body(prompt, draft))  # warm: graph and buffers in place
    _, to_coordinator, between = pools.moved(verify_body(prompt, draft))
    hidden = 9 * pools.n_embd * 4  # one boundary's rows (k + 1 = 9 after the cached prompt)
    print(f"\nk = 8 verify: from the workers to the coordinator {to_coordinator.bytes_down} B, "
          f"between workers {between.bytes_up} B (one boundary: {hidden} B)")
    # two boundaries (3 workers), each crossed once, worker to worker
    assert 2 * hidden <= between.bytes_up < 2 * hidden + 4096
    # the coordinator gets the top-16 rows and small replies, no hidden state
    assert to_coordinator.bytes_down < hidden


def test_an_unreachable_peer_falls_back_to_the_relay(pools: Pools, bin_dir: Path,
                                                     models: ModelSet,
                                                     tmp_path: Path) -> None:
    with ProcessGroup(bin_dir=bin_dir, log_dir=tmp_path) as group:
        workers = [group.rpc_worker(name=f"w{i}", peer=True) for i in range(2)]
        dead = f"127.0.0.1:{free_port()}"  # nothing listens: every push fails to connect
        server = group.llama_server(
            models.target, name="lost-peer", rpc=workers, args=ARGS, timeout=300,
            peers={workers[0].endpoint: workers[0].peer, workers[1].endpoint: dead})
        prompt = tokenize(server, PROMPTS[1])
        assert greedy(server, prompt, 16) == greedy(pools.relay, prompt, 16)
        assert "relaying through this host" in server.log_text()
