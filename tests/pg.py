"""The tests' PostgreSQL server (the class lives with the benches, which start one too)."""

from bench.postgres import PostgresServer, find_bin_dir

__all__ = ["PostgresServer", "find_bin_dir"]
