"""The link relays in a process of their own, so that the load generator's threads (up to 16
streams parsing SSE) do not share an interpreter, and its GIL, with the relays' timers.

The child runs :class:`tightwad.pool.linkemu.RelayThread` and speaks one JSON line per command on
its stdin/stdout: at start it prints its endpoints; ``stats`` answers one counter dict per relay;
end of input closes the relays and exits::

    relays = RelayProcess(["127.0.0.1:50052", ...], "wifi", seed=0)
    relays.endpoints   # ["127.0.0.1:<port>", ...]
    relays.stats()     # [LinkStats, ...]
    relays.close()
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence

from tightwad.pool.linkemu import LinkProfile, LinkStats, RelayThread


class RelayProcess:
    """Relays to ``upstreams`` over ``profile``, served by a child process."""

    def __init__(self, upstreams: Sequence[str], profile: LinkProfile, seed: int = 0) -> None:
        spec = {"upstreams": list(upstreams), "seed": seed,
                "profile": [profile.name, profile.delay_s, profile.jitter_s,
                            profile.bandwidth_bps]}
        self.profile = profile
        self._proc = subprocess.Popen([sys.executable, __file__, json.dumps(spec)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        first = self._proc.stdout.readline() if self._proc.stdout else ""
        if not first:
            self._proc.wait(10)
            raise RuntimeError(f"the relay process exited with code {self._proc.returncode}")
        self.endpoints: list[str] = json.loads(first)["endpoints"]

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stats(self) -> list[LinkStats]:
        """A snapshot of each relay's counters."""
        assert self._proc.stdin and self._proc.stdout
        self._proc.stdin.write("stats\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the relay process died (code {self._proc.poll()})")
        return [LinkStats(**d) for d in json.loads(line)]

    def close(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)
        if self._proc.stdout:
            self._proc.stdout.close()


def _child(spec_json: str) -> int:
    spec = json.loads(spec_json)
    name, delay, jitter, bandwidth = spec["profile"]
    profile = LinkProfile(name, delay_s=delay, jitter_s=jitter, bandwidth_bps=bandwidth)
    with RelayThread(spec["upstreams"], profile, seed=spec["seed"]) as relays:
        print(json.dumps({"endpoints": relays.endpoints}), flush=True)
        for line in sys.stdin:
            if line.strip() == "stats":
                print(json.dumps([s.as_dict() for s in relays.stats()]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
