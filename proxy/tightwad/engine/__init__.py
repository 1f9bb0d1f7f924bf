"""A request's life in the proxy: slot lease, mode dispatch, the speculation rounds,
pass-through, failure mapping and the telemetry they feed. No HTTP here."""
