"""Development tools, not shipped in the wheel: test model factories, the systemd-nspawn test
hosts, the link emulator, in-process proxies and HTTP helpers for tests, benchmark math."""
