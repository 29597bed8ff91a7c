"""The ledger's schema: tables, indexes and named migrations, written once for every backend.

A migration is a name and a list of steps. Steps are portable: table definitions use the column
types below (rendered per backend by :class:`Dialect`), added columns and indexes say what they add
and are skipped when it is already there. Applied migrations are recorded by name in
``_migrations``, so a database created by an older kdgate (when these were written with
sqlite-utils) is brought up to date by the same list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["EXCHANGE_COLUMNS", "MIGRATIONS", "Migration", "Table", "AddColumn", "Index"]

# Columns of the ``exchanges`` table, in order, with their portable types. JSON columns hold text.
EXCHANGE_COLUMNS: dict[str, str] = {
    "id": "pk",
    "uid": "text",  # the response id returned to the client (also x-request-id)
    "ts": "real",  # unix time the request arrived
    "route": "text",
    "key_id": "text",  # id of the gateway key used ("" without auth); never the key itself
    "endpoint": "text",  # "chat.completions" | "embeddings" | ...
    "model": "text",  # what the client asked for
    "teacher_model": "text",  # the litellm model string of the route's teacher
    "request": "text",  # JSON: messages and parameters, as sent (no credentials)
    "response": "text",  # JSON: the full OpenAI response body (streams are reassembled)
    "answer": "text",  # the first choice's text content (what the distiller learns from)
    "finish_reason": "text",
    "prompt_tokens": "int",
    "completion_tokens": "int",
    "cached_tokens": "int",
    "reasoning_tokens": "int",
    "cost_usd": "real",  # what this exchange cost (shadow checks' teacher calls are in shadow_checks)
    "counterfactual_usd": "real",  # what the teacher alone would have cost
    "latency_ms": "real",
    "status": "int",  # HTTP status returned to the client
    "error": "text",
    "served_by": "text",  # "teacher" | "student" | "gateway"
    "student_version": "int",
    "confidence": "real",
    "teacher_logprobs": "text",  # JSON: choices[0].logprobs.content as returned by the teacher
    "stream": "int",
    "student_answer": "text",  # what the student said (served, escalated or shadowed requests)
}


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, str], ...]  # (name, portable type); a trailing " NOT NULL" / " DEFAULT x" is kept
    primary_key: tuple[str, ...] = ()  # a composite key (a single "pk" column needs none)
    rowless: bool = False  # stored by its primary key (SQLite WITHOUT ROWID)

    def ddl(self, d: Any) -> str:
        cols = []
        for name, spec in self.columns:
            kind, _, rest = spec.partition(" ")
            cols.append(f"{name} {d.column_type(kind)}{(' ' + rest) if rest else ''}")
        if self.primary_key:
            cols.append(f"PRIMARY KEY ({', '.join(self.primary_key)})")
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({', '.join(cols)})" + (d.without_rowid if self.rowless else "")


@dataclass(frozen=True)
class AddColumn:
    table: str
    column: str
    kind: str


@dataclass(frozen=True)
class Index:
    name: str
    table: str
    columns: tuple[str, ...]
    unique: bool = False

    def ddl(self, d: Any) -> str:
        return f"CREATE {'UNIQUE ' if self.unique else ''}INDEX IF NOT EXISTS {self.name} ON {self.table} ({', '.join(self.columns)})"


Step = Table | AddColumn | Index


@dataclass(frozen=True)
class Migration:
    name: str
    steps: tuple[Step, ...]


def _exchanges() -> Table:
    cols = []
    for name, kind in EXCHANGE_COLUMNS.items():
        if name == "student_answer":
            continue  # added by 003 (tables created by 001 before it existed lack it)
        cols.append((name, kind + (" NOT NULL" if name in ("uid", "ts", "route") else "")))
    return Table("exchanges", tuple(cols))


MIGRATIONS: tuple[Migration, ...] = (
    Migration("001_initial", (
        _exchanges(),
        Index("idx_exchanges_uid", "exchanges", ("uid",), unique=True),
        Index("idx_exchanges_route_ts", "exchanges", ("route", "ts")),
        Index("idx_exchanges_ts", "exchanges", ("ts",)),
        Table("routes", (("name", "pk_text"), ("teacher_model", "text"), ("settings", "text"), ("template", "text"),
                         ("origin", "text"), ("created", "real"), ("updated", "real"))),
        Table("api_keys", (("id", "pk_text"), ("name", "text"), ("hash", "text"), ("created", "real"), ("revoked", "real"))),
        Index("idx_api_keys_hash", "api_keys", ("hash",), unique=True),
    )),
    Migration("002_students", (
        Table("embeddings", (("exchange_id", "bigint"), ("model", "text"), ("dim", "int"), ("vector", "blob")),
              primary_key=("exchange_id", "model")),
        Table("students", (("id", "pk"), ("route", "text"), ("version", "int"), ("kind", "text"), ("created", "real"),
                           ("train_pairs", "int"), ("val_pairs", "int"), ("metrics", "text"), ("curve", "text"),
                           ("calibration", "text"), ("artifact_path", "text"), ("checksum", "text"), ("status", "text"))),
        Index("idx_students_route_version", "students", ("route", "version"), unique=True),
        Table("route_events", (("id", "pk"), ("ts", "real"), ("route", "text"), ("kind", "text"), ("actor", "text"),
                               ("detail", "text"))),
        Index("idx_route_events_route_ts", "route_events", ("route", "ts")),
        Table("shadow_checks", (("id", "pk"), ("ts", "real"), ("route", "text"), ("exchange_uid", "text"),
                                ("student_version", "int"), ("student_answer", "text"), ("teacher_answer", "text"),
                                ("agree", "int"), ("cost_usd", "real"))),
        Index("idx_shadow_checks_route_ts", "shadow_checks", ("route", "ts")),
    )),
    Migration("003_student_answer", (
        AddColumn("exchanges", "student_answer", "text"),
        Index("idx_exchanges_route_served_by", "exchanges", ("route", "served_by")),
    )),
    Migration("004_key_limits", (
        AddColumn("api_keys", "rpm", "int"),
        AddColumn("api_keys", "tpm", "bigint"),
        AddColumn("api_keys", "budget_day_usd", "real"),
        AddColumn("api_keys", "budget_month_usd", "real"),
        Index("idx_exchanges_key_id_ts", "exchanges", ("key_id", "ts")),
    )),
    Migration("005_key_scopes", (
        AddColumn("api_keys", "routes", "text"),  # JSON list of route names or globs; NULL: every route
    )),
    # The dashboard's rollups (store.rollups). Databases from before this migration may hold these
    # tables already (they were created on first use), hence IF NOT EXISTS in every Table.
    Migration("006_rollups", (
        Table("stats_hourly", (("route", "text NOT NULL"), ("hour", "bigint NOT NULL"), ("requests", "bigint NOT NULL DEFAULT 0"),
                               ("ok", "bigint NOT NULL DEFAULT 0"), ("student", "bigint NOT NULL DEFAULT 0"),
                               ("escalated", "bigint NOT NULL DEFAULT 0"), ("errors", "bigint NOT NULL DEFAULT 0"),
                               ("cost_usd", "real NOT NULL DEFAULT 0"), ("counterfactual_usd", "real NOT NULL DEFAULT 0"),
                               ("prompt_tokens", "bigint NOT NULL DEFAULT 0"), ("completion_tokens", "bigint NOT NULL DEFAULT 0")),
              primary_key=("route", "hour"), rowless=True),
        Index("stats_hourly_hour", "stats_hourly", ("hour",)),
        Table("stats_latency", (("route", "text NOT NULL"), ("day", "bigint NOT NULL"), ("served_by", "text NOT NULL"),
                                ("bucket", "int NOT NULL"), ("n", "bigint NOT NULL DEFAULT 0")),
              primary_key=("route", "day", "served_by", "bucket"), rowless=True),
        Table("stats_shadow", (("route", "text NOT NULL"), ("hour", "bigint NOT NULL"), ("student_version", "int NOT NULL"),
                               ("checks", "bigint NOT NULL DEFAULT 0"), ("agree", "bigint NOT NULL DEFAULT 0"),
                               ("cost_usd", "real NOT NULL DEFAULT 0")),
              primary_key=("route", "hour", "student_version"), rowless=True),
        Table("stats_watermark", (("source", "pk_text"), ("last_id", "bigint NOT NULL"))),
        Index("shadow_checks_exchange_uid", "shadow_checks", ("exchange_uid",)),
    )),
    # Change counters: every write to routes or keys bumps its generation, so a gateway (one of
    # several replicas, or beside a CLI) reloads what changed within a poll.
    Migration("007_generations", (
        Table("generations", (("name", "pk_text"), ("value", "bigint NOT NULL DEFAULT 0"))),
    )),
    # Ids missing below a rollup's watermark, folded when their rows appear (PostgreSQL commits out
    # of id order; see store.rollups).
    Migration("008_rollup_holes", (
        Table("stats_holes", (("source", "text NOT NULL"), ("id", "bigint NOT NULL"), ("seen", "real NOT NULL")),
              primary_key=("source", "id")),
    )),
    # Per-key limits shared by every replica (store.counters): requests and tokens of the last
    # minute, spend per day and month, and the budget held by requests in flight.
    Migration("009_shared_limits", (
        Table("rate_events", (("id", "pk"), ("key_id", "text NOT NULL"), ("ts", "real NOT NULL"),
                              ("requests", "int NOT NULL DEFAULT 0"), ("tokens", "bigint NOT NULL DEFAULT 0"))),
        Index("idx_rate_events_key_ts", "rate_events", ("key_id", "ts")),
        Table("key_spend", (("key_id", "text NOT NULL"), ("period", "text NOT NULL"), ("spend", "real NOT NULL DEFAULT 0")),
              primary_key=("key_id", "period")),
        Table("budget_holds", (("uid", "pk_text"), ("key_id", "text NOT NULL"), ("amount", "real NOT NULL"),
                               ("at", "real NOT NULL"))),
        Index("idx_budget_holds_key", "budget_holds", ("key_id",)),
        # dashboard sessions, shared by every replica (the admin key itself is never stored)
        Table("sessions", (("sid_hash", "pk_text"), ("csrf", "text NOT NULL"), ("expires", "real NOT NULL"),
                           ("admin_hash", "text NOT NULL"))),
    )),
    # Responses API objects stored for GET /v1/responses/{id} and previous_response_id: the response
    # as returned, and the conversation's items up to and including it (input and output items,
    # without the request's instructions, which a follow-up does not inherit). Owned by a key.
    Migration("010_responses", (
        Table("responses", (("id", "pk_text"), ("key_id", "text NOT NULL"), ("route", "text"), ("ts", "real NOT NULL"),
                            ("expires", "real NOT NULL"), ("items", "text NOT NULL"), ("response", "text NOT NULL"))),
        Index("idx_responses_expires", "responses", ("expires",)),
    )),
    # Shadow checks sampled by the student's confidence (router.certify.check_probability): each row
    # keeps the probability it was checked with, so its inverse weighs it (None: the route's flat rate).
    Migration("011_check_probability", (
        AddColumn("shadow_checks", "sample_prob", "real"),
        AddColumn("shadow_checks", "confidence", "real"),
    )),
)
