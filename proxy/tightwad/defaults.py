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
RPC_PEER_PORT_OFFSET: Final = 100
"""A worker takes the hidden states other workers push to it (``--peer``, patch 0007) on its
port + this; 0: it does not, and they pass through the coordinator (stock llama.cpp)."""
"""The rpc_worker role's default: a worker host without rpc_worker_instances runs this one."""

LOCAL_WORKER_PORTS: Final = (RPC_PORT, RPC_PORT + 1)
"""The local loopback pool's workers (the demo and ``tightwad start --local``)."""

DISCOVERY_RPC_PORTS: Final = (RPC_PORT, RPC_PORT + 1, RPC_PORT + 2, RPC_PORT + 3)
DISCOVERY_HTTP_PORTS: Final = (8080, PROXY_PORT, COORDINATOR_PORT, DRAFTER_PORT)
"""What ``tightwad init`` probes: 8080 is llama-server's own default port."""

VERIFY_MAX_TOKENS: Final = 32
"""The most prompt tokens one verify may score (the verify patch's ``--verify-max-tokens``):
the proxy's k_max plus the tokens whose bytes are still unknown."""

OUTPUT_TOP_N: Final = 64
"""The coordinator's ``--output-top-n`` (our patch 0005): the graph computes each output row's top
64 log-probabilities on the worker that holds the output layer, so a k=8 verify pulls ~6 KB over
the pool's link instead of k x n_vocab logits (4.6 MB at a 128k vocabulary). Exact while every
request in a batch needs at most this many (the proxy asks top_k + banned ids, at most
speculation.n_probs 40 + a few); any other request makes that batch fetch full logits as before."""

COORDINATOR_ARGS: Final = ("--output-top-n", str(OUTPUT_TOP_N), "--jinja")
"""What makes a llama-server a Tightwad coordinator besides its model, workers, the pool settings
and ``--verify-max-tokens``: the top-n on the device, and the model's own chat template (tools,
structured output) made explicit."""

SLOTS: Final = 4
"""Parallel slots (``-np``) of the coordinator and drafter: requests served at once."""

CTX_SIZE: Final = "auto"
"""A deployed coordinator's / drafter's total context (shared by its slots): ``auto`` gives each
slot the model's trained context as far as memory allows, never below CTX_PER_SLOT_FLOOR
(``tightwad.pool.context``); an integer sets it."""

CTX_PER_SLOT_FLOOR: Final = 2048
"""The least context per slot ``auto`` chooses (it says so when memory does not allow it)."""

CTX_PER_SLOT_SMALL: Final = 4096
"""``doctor`` warns when a slot has less (unless the model was trained on less)."""

LOCAL_CTX_SIZE: Final = 16384
"""The local pool's context, all slots together: each of its 4 slots gets the demo models' whole
trained context (4096), which costs only ~32 MB of KV cache for these tiny models."""

LLAMA_SERVER_ARGS: Final = ("--cache-ram", "0", "--no-cache-idle-slots")
"""What every coordinator and drafter llama-server runs with, besides its model, slots and
ports (the llama_server role's ``llama_server_pool_args``, the local pool, the test and bench
pools). ``--cache-ram 0`` turns off llama-server's host-RAM prompt cache: by default it saves
every idle slot on each new task (``--cache-idle-slots``) and a slot's old conversation when
another takes the slot, and over RPC a save reads that slot's whole KV cache back from the
workers, layer by layer with blocking round trips, inside the server's main loop that all
streams wait on; through the proxy every speculation round is a new task. (A restore would
write it back the same way.) ``--no-cache-idle-slots`` says so explicitly: no warning that the
cache is off, and no per-task saves should ``--cache-ram`` be turned back on. docs/deploy.md
("llama-server settings") has the measurements."""

VERIFY_GATHER_MS: Final = 0.0
"""The proxy's verify gathering window (``speculation.gather_ms``, 0 = off): how long past the
moment the coordinator is free a ready verify may wait for the other streams' verifies, so the
coordinator evaluates them in one batch (docs/proxy.md, "Verify gathering"). Off by default: the
only measurement so far (bench/verify_gather.py, 100 ms, a loaded 2-core machine whose pool is
compute-bound) gave 0.94x at 4 and 8 streams; turn it on (100) where a batch costs mostly
network round trips, and measure."""

OVERLAP_DRAFTING: Final = True
"""Overlapped drafting (``speculation.overlap``): the drafter continues a draft while the
coordinator verifies it, so a round that accepts everything starts the next without waiting for
the drafter. The drafter would idle during the verify otherwise; the output is the same."""

REGIME_WINDOW_S: Final = 3.0
"""Under load (two streams or more) the proxy alternates windows of this many seconds in which
every stream drafts, or none does, and runs the regime that gave more tokens per second
(:class:`tightwad.decoding.speculation.LoadRegimes`): a stream's own costs cannot see that its
drafted rows slow everyone's batch on a compute-bound pool. Long enough for several rounds of
8-token bursts at 8 streams on a CPU pool."""

REGIME_REFRESH_S: Final = 30.0
"""The regime not running is measured again (one window) once its rate is this old: at most a
tenth of the time goes to the slower one, and less as it keeps losing (the period doubles each
time, up to 8x: :attr:`tightwad.decoding.speculation.LoadRegimes.MAX_BACKOFF`)."""

TARGET_ONLY_BURST: Final = 8
"""Where drafting is paused (it cannot pay at the current load), hopeless for a request or the
drafter is down, the target streams its own tokens in one generation; every this many tokens
the next round is planned (one round for the load regimes and probes), and the stream is cut
where it may draft. Small enough that drafting resumes within a few tokens."""

SSE_KEEPALIVE_S: Final = 10.0
"""How often a waiting stream (queued, or prefilling a long prompt) sends an SSE comment line,
so idle timeouts of reverse proxies and clients (often 30-60 s) do not cut it."""

# -- what one client may cost the proxy (docs/proxy.md, "Limits"; docs/reliability.md) ----------

MAX_STOP_STRINGS: Final = 16
"""Most stop strings one request may give (``limits.max_stop_strings``); more get 400."""

MAX_STOP_CHARS: Final = 1024
"""Longest stop string, in characters (``limits.max_stop_chars``); longer get 400. Matching is
linear in the text either way; the bound keeps per-request set-up and held-back text small."""

MAX_QUEUED: Final = 64
"""Most requests waiting for a coordinator slot (``limits.max_queued``); one more gets 429 with
Retry-After at once, before its body is tokenized."""

QUEUE_TIMEOUT_S: Final = 300.0
"""Longest wait for a coordinator slot (``limits.queue_timeout_s``); then 503 with Retry-After
(an error event and ``[DONE]`` on a stream)."""

WRITE_TIMEOUT_S: Final = 30.0
"""Longest a write to a client may block (``listen.write_timeout_s``): a client that stops
reading a stream loses it after this long, and its coordinator slot is freed (after an eighth
of it while another request waits for a slot: ``tightwad.server.app.STALLED_SHARE``)."""

MAX_CONNECTIONS: Final = 256
"""Most client connections the proxy holds open (``listen.max_connections``); one more gets 503
with Retry-After and is closed."""

KEEPALIVE_TIMEOUT_S: Final = 15.0
"""How long an idle client connection stays open (``listen.keepalive_timeout_s``); also the
longest a new connection may take to send its first request's headers."""

HEALTH_CACHE_S: Final = 1.0
"""``/health`` reuses the coordinator's last answer for this long, and concurrent calls share
one look, so polling ``/health`` never costs the coordinator more than one call per period."""
