"""How the proviso command fails: no server at --target, or a reader that stops reading."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests.conftest import EXAMPLE_POLICIES, ROOT
from tests.integration.serve_process import PROVISO
from tests.integration.test_cli import run

IDENTITY = ("--identity-token", "not.checked.here")
"""Sent as is: the call fails before any server could look at it."""


def _closed_port() -> str:
    """127.0.0.1:PORT where nothing listens (a port the kernel just handed out and freed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.parametrize(
    "command",
    [
        ("check", "--token", "t", "--tool", "getInvoice", "--args", "{}"),
        ("token", "attenuate", "--token", "t", "--grant", "getInvoice"),
        ("token", "revoke", "--token-id", "tok_1", "--reason", "x", *IDENTITY),
        ("token", "inspect", "--token", "e30.e30.x"),
        ("kill", "list", *IDENTITY),
        ("approvals", "list", *IDENTITY),
        ("policy", "show", *IDENTITY),
    ],
    ids=lambda command: "-".join(command[:2]),
)
def test_no_server_at_the_target_asks_whether_proviso_runs_there(
    command: tuple[str, ...],
) -> None:
    """A connection failure keeps gRPC's own words and adds a hint naming the target, on
    every command that calls a server; exit 1."""
    target = _closed_port()
    result = run(*command, "--target", target, "--timeout", "5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "UNAVAILABLE: " in result.stderr
    assert f"proviso: is proviso running at {target}? (--target)\n" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_usage_error_gets_no_connection_hint() -> None:
    """The hint is for connection failures only."""
    result = run("kill", "list", "--target", _closed_port())
    assert result.returncode == 2
    assert "is proviso running" not in result.stderr


def run_into_a_closed_pipe(*args: str, buffered: bool) -> subprocess.CompletedProcess[str]:
    """``proviso ARGS`` with stdout a pipe whose reader has already gone, as when ``head -1``
    has read its line: every write to stdout fails with EPIPE. ``buffered`` is Python's
    default (the failure comes at a flush); unbuffered, it comes at the write itself."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [*PROVISO, *args], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True,
            env=env, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    ("command", "buffered"),
    [
        (("test", str(EXAMPLE_POLICIES)), True),
        (("test", str(EXAMPLE_POLICIES)), False),
        (("lint", str(EXAMPLE_POLICIES), "--format", "json"), True),
        (("lint", str(EXAMPLE_POLICIES), "--format", "json"), False),
        (("token", "--help"), True),  # unbuffered, argparse ignores the failed write itself
    ],
)
def test_a_reader_that_stops_reading_gets_no_traceback(
    command: tuple[str, ...], *, buffered: bool
) -> None:
    """`proviso ... | head -1`: the command stops quietly, SIGPIPE-style (exit 141), with no
    BrokenPipeError traceback on stderr."""
    result = run_into_a_closed_pipe(*command, buffered=buffered)
    assert result.stderr == ""
    assert result.returncode == 141
