"""Settings: frozen, built from flags, then PROVISO_* environment variables, then defaults."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"
DEFAULT_STATE_DIR = ".proviso"
DEFAULT_AUDIENCE = "proviso"
DEFAULT_TOKEN_ISSUER = "proviso"
DEFAULT_LEEWAY_SECONDS = 5
MAX_LEEWAY_SECONDS = 30
"""Clock skew tolerated on capability tokens' nbf/exp; bounded, as tokens.verify bounds it."""
DEFAULT_MAX_IN_FLIGHT = 256
MAX_WORKERS = 64
DEFAULT_AUDIT_GROUP_COMMIT_MS = 4
"""How long a Check may wait, under load, for the Checks arriving with it (decided together,
their audit records written with one fsync)."""
MAX_AUDIT_GROUP_COMMIT_MS = 100


class SettingsError(ValueError):
    """A setting is invalid; the message names it."""


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port to listen on."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, setting: str) -> Address:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
            raise SettingsError(f"{setting}: expected HOST:PORT, got {text!r}")
        return cls(host.strip("[]"), int(port))

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``serve`` needs. No module reads the environment but this one."""

    policies: Path
    listen: Address
    metrics_listen: Address
    state_dir: Path
    audience: str = DEFAULT_AUDIENCE
    token_issuer: str = DEFAULT_TOKEN_ISSUER
    leeway_seconds: int = DEFAULT_LEEWAY_SECONDS
    idp_jwks: Path | None = None
    idp_jwks_url: str = ""
    idp_ca_file: Path | None = None
    idp_issuer: str = ""
    key_refresh_seconds: float = 1.0
    idp_audience: str = DEFAULT_AUDIENCE
    groups_claim: str = "groups"
    log_level: str = "INFO"
    audit_log: Path | None = None
    shadow_policies: Path | None = None
    """A candidate bundle evaluated beside the active one on every Check; it never decides."""
    watch_interval_seconds: float = 1.0
    """How often the policy directories are polled for changes; 0 turns the watcher off."""
    audit_checkpoint_every: int = 1000
    audit_checkpoint_seconds: float = 5.0
    audit_max_file_bytes: int = 64 * 1024 * 1024
    audit_sibling_logs: tuple[str, ...] = ()
    """Every chain of one ``serve --workers N`` (file names), named in each signed checkpoint."""
    audit_group_commit_seconds: float = DEFAULT_AUDIT_GROUP_COMMIT_MS / 1000
    """How long a Check may wait for others arriving together: one state transaction and one
    audit fsync for all of them (``serve --audit-group-commit``)."""
    trace_exporters: tuple[str, ...] = ()
    """OpenTelemetry exporters (``OTEL_TRACES_EXPORTER``); empty: tracing is off."""
    trace_service_name: str | None = "proviso"
    """None when ``OTEL_SERVICE_NAME`` is set: the OpenTelemetry SDK then reads it itself."""
    workers: int = 1
    """Server processes sharing the listen port (``serve --workers``); each its own audit chain."""
    reuse_port: bool = False
    """Bind with SO_REUSEPORT: only worker processes do, so a taken port is otherwise an error."""
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    """Checks decided at once per process; more are refused with RESOURCE_EXHAUSTED."""

    @property
    def dev_mode(self) -> bool:
        """No IdP configured: the dev IdP in the state directory is trusted."""
        return self.idp_jwks is None and not self.idp_jwks_url

    @property
    def audit_path(self) -> Path:
        """Where decisions are recorded; by default inside the state directory."""
        return self.audit_log or self.state_dir / "audit" / "decisions.jsonl"

    @property
    def audit_dir(self) -> Path:
        """The directory of the audit log: every worker's chain is in it."""
        return self.audit_path.parent

    def for_worker(self, index: int, *, listen_port: int, metrics_port: int) -> Settings:
        """This process's settings as worker ``index`` of ``workers``: the shared port (with
        SO_REUSEPORT), its own audit chain (``decisions.w0.jsonl``…) and metrics port."""
        active = self.audit_path
        chains = tuple(f"{active.stem}.w{i}{active.suffix}" for i in range(self.workers))
        return replace(
            self,
            listen=Address(self.listen.host, listen_port),
            metrics_listen=Address(self.metrics_listen.host, metrics_port),
            audit_log=active.with_name(chains[index]),
            audit_sibling_logs=chains,
            reuse_port=True,
        )


def setting(flag: str | None, env_name: str, default: str, env: Mapping[str, str]) -> str:
    """A flag wins over ``PROVISO_<NAME>``, which wins over the default."""
    if flag is not None:
        return flag
    return env.get(f"PROVISO_{env_name}", default)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL"}
"""Names Python's logging takes too (``logging.WARN``, ``logging.FATAL``)."""


def _log_level(text: str, source: str) -> str:
    """A log level's name, in capitals; ``source`` (the flag or variable) names it in errors.

    Raises:
        SettingsError: it names none of ``LOG_LEVELS`` (or their aliases).
    """
    level = _LOG_LEVEL_ALIASES.get(text.upper(), text.upper())
    if level not in LOG_LEVELS:
        raise SettingsError(
            f"{source}: expected {', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}, got {text!r}"
        )
    return level


def _count(name: str, text: str, maximum: int) -> int:
    """A whole number from 1 to ``maximum``.

    Raises:
        SettingsError: it is not one.
    """
    if not text.strip().isdigit() or not 1 <= int(text) <= maximum:
        raise SettingsError(f"{name}: expected a whole number from 1 to {maximum}, got {text!r}")
    return int(text)


def _number(name: str, text: str, maximum: float, expected: str) -> float:
    """A number from 0 to ``maximum`` (``expected`` says which, in the error).

    Raises:
        SettingsError: it is not one (NaN included).
    """
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= maximum:
        raise SettingsError(f"{name}: {expected}, got {text!r}")
    return value


def _trace_exporters(env: Mapping[str, str]) -> tuple[str, ...]:
    """The standard ``OTEL_TRACES_EXPORTER`` list, empty when the SDK is disabled."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    names = (name.strip() for name in env.get("OTEL_TRACES_EXPORTER", "").split(","))
    return tuple(name for name in names if name and name != "none")


def build(
    *,
    policies: str | None,
    listen: str | None,
    metrics_listen: str | None,
    state_dir: str | None,
    idp_jwks: str | None = None,
    idp_issuer: str | None = None,
    idp_ca_file: str | None = None,
    token_leeway: str | None = None,
    log_level: str | None = None,
    shadow_policies: str | None = None,
    watch_interval: str | None = None,
    workers: str | None = None,
    max_in_flight: str | None = None,
    audit_group_commit: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Settings from flags and the environment.

    Raises:
        SettingsError: a value is malformed, or a listener is not on loopback (plaintext is
            only allowed on loopback until TLS is configured).
    """
    env = os.environ if env is None else env
    jwks = setting(idp_jwks, "IDP_JWKS", "", env)
    shadow = setting(shadow_policies, "SHADOW_POLICIES", "", env)
    interval = _number(
        "--watch-interval",
        setting(watch_interval, "WATCH_INTERVAL", "1", env),
        3600,
        "expected seconds between 0 (off) and 3600",
    )
    jwks_url = jwks if jwks.startswith(("https://", "http://")) else ""
    ca_file = setting(idp_ca_file, "IDP_CA_FILE", "", env)
    leeway_text = setting(token_leeway, "TOKEN_LEEWAY", str(DEFAULT_LEEWAY_SECONDS), env)
    if not leeway_text.isdigit() or int(leeway_text) > MAX_LEEWAY_SECONDS:
        raise SettingsError(
            f"--token-leeway: whole seconds from 0 to {MAX_LEEWAY_SECONDS}, got {leeway_text!r}"
        )
    worker_count = _count(
        "--workers", setting(workers, "WORKERS", str(os.cpu_count() or 1), env), MAX_WORKERS
    )
    in_flight = _count(
        "--max-in-flight",
        setting(max_in_flight, "MAX_IN_FLIGHT", str(DEFAULT_MAX_IN_FLIGHT), env),
        1_000_000,
    )
    gather_ms = _number(
        "--audit-group-commit",
        setting(audit_group_commit, "AUDIT_GROUP_COMMIT", str(DEFAULT_AUDIT_GROUP_COMMIT_MS), env),
        MAX_AUDIT_GROUP_COMMIT_MS,
        f"milliseconds from 0 (never wait) to {MAX_AUDIT_GROUP_COMMIT_MS}",
    )
    settings = Settings(
        policies=Path(setting(policies, "POLICIES", "policies", env)),
        listen=Address.parse(setting(listen, "LISTEN", DEFAULT_LISTEN, env), "--listen"),
        metrics_listen=Address.parse(
            setting(metrics_listen, "METRICS_LISTEN", DEFAULT_METRICS_LISTEN, env),
            "--metrics-listen",
        ),
        state_dir=Path(setting(state_dir, "STATE_DIR", DEFAULT_STATE_DIR, env)),
        idp_jwks=Path(jwks) if jwks and not jwks_url else None,
        idp_jwks_url=jwks_url,
        idp_ca_file=Path(ca_file) if ca_file else None,
        idp_issuer=setting(idp_issuer, "IDP_ISSUER", "", env),
        leeway_seconds=int(leeway_text),
        log_level=_log_level(
            setting(log_level, "LOG_LEVEL", "INFO", env),
            "--log-level" if log_level is not None else "PROVISO_LOG_LEVEL",
        ),
        shadow_policies=Path(shadow) if shadow else None,
        watch_interval_seconds=interval,
        trace_exporters=_trace_exporters(env),
        trace_service_name=None if env.get("OTEL_SERVICE_NAME") else "proviso",
        workers=worker_count,
        max_in_flight=in_flight,
        audit_group_commit_seconds=gather_ms / 1000,
    )
    for name, address in (
        ("--listen", settings.listen),
        ("--metrics-listen", settings.metrics_listen),
    ):
        if not address.is_loopback:
            raise SettingsError(
                f"{name} {address}: plaintext is only served on loopback; TLS is not configured"
            )
    if not settings.dev_mode and not settings.idp_issuer:
        raise SettingsError("--idp-issuer is required with --idp-jwks")
    return settings
