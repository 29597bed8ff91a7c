"""The store: kdgate's one persistence layer, shared by the gateway and the distiller.

Schema and named migrations (:mod:`store.schema`), typed reads and the off-path writes
(:class:`Ledger`), the batched writer of the request path (:class:`LedgerWriter`), the student
registry and the dashboard's rollups. It imports nothing else of kdgate's, and no other module holds
SQL (``tests/test_layers.py`` checks both).
"""

from store.ledger import Ledger
from store.schema import EXCHANGE_COLUMNS, MIGRATIONS
from store.sqlite import connect, migrate
from store.types import Pair, SchemaTooNew, StoreError, StudentRefused
from store.writer import LedgerWriter

__all__ = [
    "Ledger", "LedgerWriter", "Pair", "StudentRefused", "StoreError", "SchemaTooNew", "EXCHANGE_COLUMNS",
    "MIGRATIONS", "connect", "migrate",
]
