"""The producer side of calq: the client, the CLI and backfills."""
