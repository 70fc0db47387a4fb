"""Settings for reload and shadow evaluation, from flags and PROVISO_* variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import SettingsError, build

BASE = {"policies": None, "listen": None, "metrics_listen": None, "state_dir": None}


def test_watch_interval_and_shadow_default_and_come_from_the_environment() -> None:
    """The watcher polls every second by default; the environment can set both settings."""
    defaults = build(**BASE, env={})
    assert (defaults.watch_interval_seconds, defaults.shadow_policies) == (1.0, None)
    env = {"PROVISO_WATCH_INTERVAL": "0", "PROVISO_SHADOW_POLICIES": "candidate"}
    from_env = build(**BASE, env=env)
    assert (from_env.watch_interval_seconds, from_env.shadow_policies) == (0.0, Path("candidate"))
    flags = build(**BASE, watch_interval="2.5", shadow_policies="c2", env=env)
    assert (flags.watch_interval_seconds, flags.shadow_policies) == (2.5, Path("c2"))


@pytest.mark.parametrize("interval", ["-1", "soon", "nan", "7200"])
def test_a_bad_watch_interval_is_a_usage_error(interval: str) -> None:
    """The interval must be seconds between 0 (off) and an hour."""
    with pytest.raises(SettingsError, match="--watch-interval"):
        build(**BASE, watch_interval=interval, env={})
