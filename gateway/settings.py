"""All of kdgate's settings, declared once with their defaults and help text.

Sources, strongest first: explicit arguments (the CLI's flags), ``KDGATE_*`` environment variables,
a TOML file (``--config`` or ``KDGATE_CONFIG``), the defaults below. Unknown keys in any source are
errors with a message that names them.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

__all__ = [
    "Settings", "RouteSettings", "PriceOverride", "SettingsError", "load_settings", "ROUTE_NAME_PATTERN",
    "valid_route_name", "MIN_ADMIN_KEY_CHARS",
]

# Matched against the whole name (``fullmatch``): ``$`` would let a trailing newline through.
ROUTE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}"
_ROUTE_NAME = re.compile(ROUTE_NAME_PATTERN)
MIN_ADMIN_KEY_CHARS = 16
Mode = Literal["off", "shadow", "cascade"]


def valid_route_name(name: object) -> bool:
    """True for a route name kdgate accepts anywhere (config, admin API, header, rename)."""
    return isinstance(name, str) and _ROUTE_NAME.fullmatch(name) is not None


class SettingsError(Exception):
    """The configuration is invalid; the message says which key and why."""


class PriceOverride(BaseModel):
    """USD prices per token for one model, overriding litellm's price map."""

    model_config = ConfigDict(extra="forbid")
    input_per_token: float = Field(ge=0)
    output_per_token: float = Field(ge=0)
    cached_input_per_token: float | None = Field(default=None, ge=0)
    reasoning_per_token: float | None = Field(default=None, ge=0)


class FallbackTeacher(BaseModel):
    """A teacher tried, in order, when the route's own teacher is down."""

    model_config = ConfigDict(extra="forbid")
    model: str
    api_base: str | None = None


class RouteSettings(BaseModel):
    """One route: a task with one teacher model and its own routing settings."""

    model_config = ConfigDict(extra="forbid")
    teacher: str | None = Field(default=None, description="litellm model string; default: the gateway's teacher")
    teacher_api_base: str | None = None
    aliases: list[str] = Field(default_factory=list, description="`model` names that select this route")
    fallback_teachers: list[FallbackTeacher] = Field(default_factory=list, description="tried in order when the teacher is down")
    mode: Mode | None = Field(default=None, description="off | shadow | cascade; default: the gateway's default_mode")
    threshold: float | None = Field(default=None, ge=0, le=1, description="escalate below this confidence")
    target_agreement: float | None = Field(default=None, gt=0, le=1, description="derive the threshold from this")
    target_confidence: float | None = Field(default=None, ge=0.5, lt=1,
                                            description="how sure the target must be met before a threshold is used (default 0.95)")
    shadow_rate: float | None = Field(default=None, ge=0, le=1)
    auto_cascade: bool | None = Field(default=None, description="move shadow -> cascade when the student is good enough")
    allow_student_when_teacher_down: bool | None = None
    pii_scrub: bool | None = None
    allowed_keys: list[str] | None = Field(
        default=None, description="gateway key ids or names that may use this route (default: every key)")
    train_on_allowed_keys_only: bool | None = Field(
        default=None, description="train the route's students only on traffic of its allowed_keys")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KDGATE_", extra="forbid", validate_default=True)

    # serving
    host: str = Field(default="127.0.0.1", description="address to bind")
    port: int = Field(default=8000, ge=0, le=65535)
    db: str = Field(default="kdgate.db", description="the ledger: a SQLite path (or sqlite:///path) or a "
                    "postgresql://user:password@host:port/dbname DSN; also KDGATE_DB, or KDGATE_DB_FILE naming a file that holds it")
    artifacts_dir: str | None = Field(default=None, description="student artifacts; default <db dir>/artifacts")
    log_level: str = "info"
    shutdown_grace_s: float = Field(default=30.0, ge=0, description="in-flight requests (streams too) get this long to finish")

    # the teacher
    teacher: str = Field(default="openai/gpt-4o-mini", description="default teacher, a litellm model string")
    teacher_api_base: str | None = Field(default=None, description="base URL of an OpenAI-compatible teacher")
    teacher_api_key: SecretStr | None = Field(default=None, description="provider key; else the provider's env var")
    teacher_timeout_s: float = Field(default=120.0, gt=0)
    teacher_retries: int = Field(default=2, ge=0, le=10, description="retries on 429/5xx/connection errors")
    retry_backoff_s: float = Field(default=0.5, ge=0, description="first backoff; doubles, with jitter")
    breaker_failures: int = Field(default=5, ge=1, description="failed calls in a row that open a teacher's circuit")
    breaker_reset_s: float = Field(default=30.0, gt=0, description="how long an open circuit fails fast")
    direct_http: bool = Field(
        default=True, description="call OpenAI-compatible teachers over HTTP directly (litellm for the rest)"
    )
    teachers: list[str] = Field(
        default_factory=list, description="more teacher models clients may name (litellm strings), besides `teacher`")
    model_patterns: list[str] = Field(
        default_factory=list, description="globs of litellm model strings clients may name, e.g. 'openai/gpt-4o*'")
    teacher_for_unknown_models: Literal["reject", "default"] = Field(
        default="reject", description="'reject': 404 model_not_found; 'default': the default teacher answers it")
    responses_ttl_days: float = Field(
        default=30.0, gt=0, description="how long stored Responses objects (store: true) stay retrievable")
    teacher_extra_params: list[str] = Field(
        default_factory=list, description="request fields passed to teachers beyond OpenAI's documented ones (e.g. top_k)")

    # auth
    auth: bool = Field(default=True, description="require gateway keys (disable only for local use)")
    admin_key: SecretStr | None = Field(default=None, description="key for the admin API and dashboard")
    ops_auth: bool = Field(default=False, description="/metrics and /readyz need the admin key too (/healthz never does)")
    login_attempts_per_minute: int = Field(default=10, ge=1, description="failed dashboard logins per client address per minute")

    # limits
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)

    # the ledger
    ledger_flush_ms: float = Field(default=50.0, gt=0, description="the most a crash can lose")
    ledger_batch: int = Field(default=512, gt=0)
    ledger_max_queue: int = Field(default=100_000, gt=0, description="rows waiting for the disk before they are dropped (counted)")
    ledger_max_queue_bytes: int = Field(
        default=512 * 1024 * 1024, gt=0, description="bytes of rows waiting for the disk before they are dropped (counted)")

    # routes and routing
    routes: dict[str, RouteSettings] = Field(default_factory=dict)
    allow_new_routes: bool = Field(
        default=False, description="accept route names (header/metadata) that are not configured yet"
    )
    max_auto_routes: int = Field(default=1000, ge=1, description="automatic routes kept apart; past this, new ones share 'auto-overflow'")
    auto_routes_per_key: bool = Field(
        default=False, description="automatic routes are per gateway key: no two keys share one (or its student)")
    template_memory_bytes: int = Field(
        default=32 * 1024 * 1024, gt=0, description="prompt text kept in memory to learn automatic routes' templates")
    default_mode: Mode = "shadow"
    default_target_agreement: float = Field(default=0.98, gt=0, le=1)
    default_shadow_rate: float = Field(default=0.05, ge=0, le=1)
    auto_cascade: bool = True
    price_overrides: dict[str, PriceOverride] = Field(default_factory=dict)

    # students
    embedded_distiller: bool = Field(default=True, description="run the distiller worker beside the gateway")
    distiller: dict[str, Any] = Field(default_factory=dict, description="distiller settings (see distiller.config)")
    student_backend: Literal["embedded", "vllm"] = "embedded"
    student_encoder_runtime: Literal["auto", "onnx", "torch"] = Field(
        default="auto", description="how embedded label students run their sentence encoder: ONNX Runtime "
        "(same vectors, a few ms less per decision; 'auto' uses it when installed) or PyTorch")
    vllm_base_url: str | None = None
    student_timeout_s: float = Field(default=5.0, gt=0)
    student_price_per_1k_tokens: float = Field(default=0.0, ge=0, description="what a student answer costs")
    student_price_per_gpu_hour: float = Field(default=0.0, ge=0)

    @field_validator("routes")
    @classmethod
    def _route_names(cls, routes: dict[str, RouteSettings]) -> dict[str, RouteSettings]:
        for name in routes:
            if not valid_route_name(name):
                raise ValueError(f"route name {name!r} must match {ROUTE_NAME_PATTERN}")
        return routes

    @field_validator("admin_key")
    @classmethod
    def _no_placeholder(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        secret = value.get_secret_value().strip()
        if secret.lower() in {"", "changeme", "change-me", "secret", "admin", "password"}:
            raise ValueError("admin_key is a placeholder; set a real secret (e.g. `openssl rand -hex 32`)")
        if len(secret) < MIN_ADMIN_KEY_CHARS:
            raise ValueError(
                f"admin_key is {len(secret)} characters; use at least {MIN_ADMIN_KEY_CHARS} (e.g. `openssl rand -hex 32`)")
        return value

    @field_validator("teacher_extra_params")
    @classmethod
    def _no_provider_options(cls, names: list[str]) -> list[str]:
        from gateway.params import is_provider_option

        bad = sorted(n for n in names if is_provider_option(n))
        if bad:
            raise ValueError(f"provider options cannot be passed from clients: {', '.join(bad)}")
        return names

    @property
    def artifacts_path(self) -> Path:
        """Student artifacts: ``artifacts_dir``, else beside a SQLite ledger, else ./artifacts (with
        PostgreSQL set it to a directory every replica and the distiller share)."""
        if self.artifacts_dir:
            return Path(self.artifacts_dir)
        if self.db.startswith(("postgresql://", "postgres://")):
            return Path("artifacts").resolve()
        path = self.db[len("sqlite:///"):] if self.db.startswith("sqlite:///") else self.db
        return Path(path).resolve().parent / "artifacts"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))


class _TomlSource(PydanticBaseSettingsSource):
    """Values from the TOML file named by ``_toml_path`` (set by :func:`load_settings`)."""

    path: Path | None = None

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if _TomlSource.path is None:
            return {}
        with open(_TomlSource.path, "rb") as fh:
            return tomllib.load(fh)


def _check_env() -> None:
    known = {f"KDGATE_{name.upper()}" for name in Settings.model_fields} | {"KDGATE_CONFIG", "KDGATE_DB_FILE"}
    unknown = sorted(k for k in os.environ if k.upper().startswith("KDGATE_") and k.upper() not in known)
    if unknown:
        raise SettingsError(
            f"Unknown kdgate environment variable(s): {', '.join(unknown)}. "
            f"Known: {', '.join(sorted(known))}."
        )


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from a TOML file, the environment and explicit overrides (None = not given)."""
    _check_env()
    path = config or os.environ.get("KDGATE_CONFIG")
    if path is not None and not Path(path).is_file():
        raise SettingsError(f"Config file {path} does not exist.")
    _TomlSource.path = Path(path) if path else None
    db_file = os.environ.get("KDGATE_DB_FILE")
    if db_file and overrides.get("db") is None and "KDGATE_DB" not in os.environ:
        try:
            overrides = {**overrides, "db": Path(db_file).read_text().strip()}
        except OSError as exc:
            raise SettingsError(f"KDGATE_DB_FILE={db_file}: cannot read it ({exc.strerror}).") from None
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(settings)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}: {msg}")
        source = f" (config file {path})" if path else ""
        raise SettingsError("Invalid kdgate settings" + source + ":\n  " + "\n  ".join(problems)) from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"Config file {path} is not valid TOML: {exc}") from None
    finally:
        _TomlSource.path = None
