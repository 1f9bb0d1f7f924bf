"""Operating a pool: defaults, inventory, layer placement, discovery, the RPC protocol, GGUF
facts, doctor's checks, and the local loopback pool with its process supervisor."""
