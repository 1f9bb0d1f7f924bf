"""A request's life in the proxy: the request loop (engine), the speculation rounds (rounds),
the two llama-servers as the engine sees them (servers) and the statistics (telemetry). No HTTP
here."""
