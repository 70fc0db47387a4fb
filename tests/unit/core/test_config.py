"""Settings from flags, then PROVISO_* variables, then defaults; plaintext only on loopback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import tokens
from sidecar.config import (
    DEFAULT_LEEWAY_SECONDS,
    MAX_LEEWAY_SECONDS,
    Address,
    Settings,
    SettingsError,
    build,
)


def _build(env: dict[str, str] | None = None, **flags: Any) -> Settings:
    values: dict[str, Any] = {
        "policies": None,
        "listen": None,
        "metrics_listen": None,
        "state_dir": None,
    }
    values.update(flags)
    return build(env=env or {}, **values)


def test_defaults_apply_when_nothing_is_set() -> None:
    """With no flags and an empty environment, the documented defaults are used."""
    settings = _build()
    assert settings.listen == Address("127.0.0.1", 50051)
    assert settings.metrics_listen == Address("127.0.0.1", 9464)
    assert settings.policies == Path("policies")
    assert settings.state_dir == Path(".proviso")
    assert settings.idp_jwks is None
    assert settings.dev_mode is True
    assert settings.log_level == "INFO"
    assert settings.audit_path == Path(".proviso/audit/decisions.jsonl")


def test_environment_variables_apply_without_flags() -> None:
    """PROVISO_* variables set what no flag sets."""
    settings = _build(
        {
            "PROVISO_LISTEN": "127.0.0.1:7000",
            "PROVISO_METRICS_LISTEN": "localhost:7001",
            "PROVISO_POLICIES": "/etc/p",
            "PROVISO_STATE_DIR": "/var/s",
            "PROVISO_LOG_LEVEL": "DEBUG",
        }
    )
    assert settings.listen == Address("127.0.0.1", 7000)
    assert settings.metrics_listen == Address("localhost", 7001)
    assert (settings.policies, settings.state_dir) == (Path("/etc/p"), Path("/var/s"))
    assert settings.log_level == "DEBUG"


def test_flags_win_over_the_environment() -> None:
    """A flag overrides its PROVISO_* variable."""
    env = {"PROVISO_LISTEN": "127.0.0.1:7000", "PROVISO_STATE_DIR": "/env"}
    settings = _build(env, listen="127.0.0.1:8000", state_dir="/flag")
    assert settings.listen.port == 8000
    assert settings.state_dir == Path("/flag")


def test_an_empty_flag_still_wins_over_the_environment() -> None:
    """A flag given as "" is a value, not absence: the variable does not apply."""
    settings = _build({"PROVISO_IDP_ISSUER": "https://idp.example"}, idp_issuer="")
    assert settings.idp_issuer == ""
    with pytest.raises(SettingsError, match="--log-level"):  # and "" is no log level
        _build({"PROVISO_LOG_LEVEL": "DEBUG"}, log_level="")


@pytest.mark.parametrize(
    ("given", "level"),
    [("debug", "DEBUG"), ("warn", "WARNING"), ("Warning", "WARNING"), ("critical", "CRITICAL"),
     ("fatal", "CRITICAL"), ("error", "ERROR")],
)  # fmt: skip
def test_log_levels_are_the_names_logging_takes(given: str, level: str) -> None:
    """Every name Python's logging takes for a level is one (a deployment with
    PROVISO_LOG_LEVEL=critical or WARN kept starting); a bad one names where it came from."""
    assert _build({"PROVISO_LOG_LEVEL": given}).log_level == level
    with pytest.raises(SettingsError, match=r"^PROVISO_LOG_LEVEL: .* got 'loud'"):
        _build({"PROVISO_LOG_LEVEL": "loud"})


def test_only_the_given_env_mapping_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit env mapping is used instead of os.environ."""
    monkeypatch.setenv("PROVISO_LISTEN", "127.0.0.1:1234")
    assert _build({}).listen.port == 50051


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "10.0.0.1:1", "[::]:1", "example.com:1",
                                    "LOCALHOST:1", "192.168.1.5:80"])  # fmt: skip
def test_a_non_loopback_listener_is_refused(listen: str) -> None:
    """Plaintext gRPC is only served on loopback; other addresses are refused, naming the flag."""
    with pytest.raises(SettingsError, match=r"--listen .*loopback"):
        _build(listen=listen)


def test_a_non_loopback_metrics_listener_is_refused() -> None:
    """The metrics listener is held to the same rule, even via the environment."""
    with pytest.raises(SettingsError, match="--metrics-listen"):
        _build({"PROVISO_METRICS_LISTEN": "0.0.0.0:9464"})


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:0", Address("127.0.0.1", 0)),
        ("127.8.9.10:65535", Address("127.8.9.10", 65535)),
        ("localhost:50051", Address("localhost", 50051)),
        ("[::1]:50051", Address("::1", 50051)),
    ],
)
def test_loopback_listeners_are_accepted(listen: str, address: Address) -> None:
    """127.0.0.0/8, ::1 and localhost are loopback."""
    assert _build(listen=listen).listen == address


@pytest.mark.parametrize(
    "listen",
    ["50051", "127.0.0.1", "127.0.0.1:", ":50051", "127.0.0.1:http", "127.0.0.1:65536",
     "127.0.0.1:-1", "127.0.0.1: 80", ""],
)  # fmt: skip
def test_a_malformed_host_port_is_refused(listen: str) -> None:
    """Anything but HOST:PORT with a port of 0-65535 is refused, naming the flag."""
    with pytest.raises(SettingsError, match="--listen: expected HOST:PORT"):
        _build(listen=listen)


def test_an_ipv6_address_prints_with_brackets() -> None:
    """str(Address) brackets IPv6 hosts so the port is unambiguous."""
    assert str(Address("::1", 5)) == "[::1]:5"
    assert str(Address("127.0.0.1", 5)) == "127.0.0.1:5"


def test_idp_jwks_without_an_issuer_is_refused() -> None:
    """Naming an IdP key set without its issuer is refused."""
    with pytest.raises(SettingsError, match="--idp-issuer is required"):
        _build(idp_jwks="/etc/jwks.json")
    with pytest.raises(SettingsError, match="--idp-issuer is required"):
        _build({"PROVISO_IDP_JWKS": "/etc/jwks.json"})


def test_idp_jwks_with_an_issuer_leaves_dev_mode() -> None:
    """With JWKS and issuer (from flag or env), the sidecar is not in dev mode."""
    settings = _build({"PROVISO_IDP_ISSUER": "https://idp"}, idp_jwks="/etc/jwks.json")
    assert settings.idp_jwks == Path("/etc/jwks.json")
    assert settings.idp_issuer == "https://idp"
    assert settings.dev_mode is False


def test_the_token_leeway_is_configurable_within_bounds() -> None:
    """--token-leeway (or PROVISO_TOKEN_LEEWAY) sets the leeway, 0 to 30 s; default 5."""
    assert _build().leeway_seconds == 5
    assert _build(token_leeway="0").leeway_seconds == 0
    assert _build({"PROVISO_TOKEN_LEEWAY": "30"}).leeway_seconds == 30
    for bad in ("31", "-1", "5.5", "five", "3600"):
        with pytest.raises(SettingsError, match="token-leeway"):
            _build(token_leeway=bad)


def test_the_leeway_bound_is_the_token_librarys() -> None:
    """The setting's bound is the one tokens.verify enforces, so they cannot drift apart."""
    assert MAX_LEEWAY_SECONDS == tokens.MAX_LEEWAY_SECONDS
    assert DEFAULT_LEEWAY_SECONDS == tokens.DEFAULT_LEEWAY_SECONDS


def test_an_https_idp_jwks_is_a_url_and_turns_dev_mode_off() -> None:
    """--idp-jwks with an https URL is fetched, not read as a file; a CA bundle may be named."""
    settings = _build(
        idp_jwks="https://idp.example.com/.well-known/jwks.json",
        idp_issuer="https://idp.example.com/",
        idp_ca_file="/etc/ssl/idp-ca.pem",
    )
    assert settings.idp_jwks_url == "https://idp.example.com/.well-known/jwks.json"
    assert settings.idp_jwks is None
    assert settings.idp_ca_file == Path("/etc/ssl/idp-ca.pem")
    assert settings.dev_mode is False
    with pytest.raises(SettingsError, match="idp-issuer"):
        _build(idp_jwks="https://idp.example.com/jwks.json")


def test_workers_default_to_the_cpu_count_and_flags_win() -> None:
    """--workers defaults to the number of CPUs; PROVISO_WORKERS and the flag override it."""
    assert _build().workers == (os.cpu_count() or 1)
    assert _build({"PROVISO_WORKERS": "3"}).workers == 3
    assert _build({"PROVISO_WORKERS": "3"}, workers="1").workers == 1


@pytest.mark.parametrize("text", ["0", "-1", "two", "", "65"])
def test_a_bad_worker_count_is_refused(text: str) -> None:
    """A worker count that is not a whole number from 1 to 64 is a usage error."""
    with pytest.raises(SettingsError, match="--workers"):
        _build(workers=text)


def test_each_worker_gets_its_own_chain_and_metrics_port() -> None:
    """Worker settings share the port (SO_REUSEPORT) and name their own audit chain."""
    settings = _build(workers="2")
    worker = settings.for_worker(1, listen_port=7000, metrics_port=9465)
    assert (worker.listen.port, worker.metrics_listen.port, worker.reuse_port) == (7000, 9465, True)
    assert worker.audit_path == Path(".proviso/audit/decisions.w1.jsonl")
    assert not settings.reuse_port, "a single process never shares its port"


def test_the_audit_group_commit_window_is_in_milliseconds() -> None:
    """Default 4 ms; a flag wins over PROVISO_AUDIT_GROUP_COMMIT; 0 turns waiting off."""
    assert _build().audit_group_commit_seconds == pytest.approx(0.004)
    env = {"PROVISO_AUDIT_GROUP_COMMIT": "1.5"}
    assert _build(env).audit_group_commit_seconds == pytest.approx(0.0015)
    assert _build(env, audit_group_commit="0").audit_group_commit_seconds == 0


@pytest.mark.parametrize("text", ["-1", "101", "soon", "", "nan"])
def test_a_bad_audit_group_commit_window_is_refused(text: str) -> None:
    with pytest.raises(SettingsError, match="--audit-group-commit"):
        _build(audit_group_commit=text)
