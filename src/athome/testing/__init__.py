"""Tools for tests and benches that build real networks (never imported by the peer commands)."""
