"""Stand-in servers for tests (named stand-ins wherever results are reported)."""
