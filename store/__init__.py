"""The store: kdgate's one persistence layer, shared by the gateway and the distiller.

Schema and named migrations (:mod:`store.schema`), typed reads and the off-path writes
(:class:`Ledger`), the batched writer of the request path (:class:`LedgerWriter`), the student
registry and the dashboard's rollups, on SQLite (embedded, the default) or PostgreSQL (several
gateway replicas), chosen by the ``db`` setting (:mod:`store.db`). It imports nothing else of kdgate's, and no other module holds
SQL (``tests/test_layers.py`` checks both).
"""

from store.db import is_postgres, redact
from store.ledger import Ledger
from store.locks import WorkerLock
from store.migrate import migrate
from store.schema import EXCHANGE_COLUMNS, MIGRATIONS
from store.sqlite import connect
from store.types import Pair, SchemaTooNew, StoreError, StudentRefused
from store.writer import LedgerWriter

__all__ = [
    "Ledger", "LedgerWriter", "Pair", "StudentRefused", "StoreError", "SchemaTooNew", "EXCHANGE_COLUMNS",
    "MIGRATIONS", "connect", "migrate", "is_postgres", "redact", "WorkerLock",
]
