"""How the proviso command fails: no server at --target, or a reader that stops reading."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_POLICIES, ROOT
from tests.integration.serve_process import PROVISO, serve_process
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


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_server_on_a_state_directory_in_use_refuses_to_start(
    tmp_path: Path, workers: str
) -> None:
    """Two servers appending to one audit chain would fork it (verify then fails): the second
    one stops at start with a message naming the log, and the first goes on serving."""
    state_dir = tmp_path / "state"
    args = (
        "--policies", str(EXAMPLE_POLICIES), "--state-dir", str(state_dir),
        "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--workers", workers,
    )  # fmt: skip
    with serve_process(args, directory=tmp_path) as first:
        second = subprocess.run(
            [*PROVISO, "serve", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        assert second.returncode == 1, second.stdout + second.stderr
        assert "is being written by another process" in second.stderr, second.stderr
        assert "AuditLogInUseError" not in second.stderr
        assert "Traceback" not in second.stderr
        assert first.process.poll() is None, first.output()
        alive = run(
            "kill", "list", "--target", first.target, "--state-dir", str(state_dir),
            "--as", "olivia@example.com",
        )  # fmt: skip
        assert alive.returncode == 0, alive.stdout + alive.stderr


def test_a_state_store_that_cannot_be_opened_stops_serve_with_a_message(tmp_path: Path) -> None:
    """`serve` names the store it cannot open and exits 1, without a traceback."""
    (tmp_path / "state.db").mkdir()
    result = subprocess.run(
        [*PROVISO, "serve", "--policies", str(EXAMPLE_POLICIES), "--state-dir", str(tmp_path),
         "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--workers", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"proviso: cannot start: cannot open the state store {tmp_path / 'state.db'}" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--target", "127.0.0.1:99999"),
        ("--target", "127.0.0.1:0"),
        ("--target", "no-port"),
        ("--timeout", "-1"),
        ("--timeout", "0"),
        ("--timeout", "nan"),
        ("--timeout", "1e10"),
        ("--target", "[::1]:\uff15\uff10\uff10\uff15\uff11"),  # full-width digits
    ],
)
@pytest.mark.parametrize(
    "command",
    [
        ("check", "--token", "t", "--tool", "getInvoice", "--args", "{}"),
        ("policy", "show", *IDENTITY),
    ],
    ids=lambda command: "-".join(command[:2]),
)
def test_an_unusable_target_or_timeout_is_a_usage_error(
    command: tuple[str, ...], option: str, value: str
) -> None:
    """A port out of range or a timeout that is no positive duration is refused before any
    connection, exit 2, naming the option: not a connection failure or an instant timeout."""
    result = run(*command, option, value)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"argument {option}: expected " in result.stderr
    assert "is proviso running" not in result.stderr


@pytest.mark.parametrize("target", ["localhost:{port}", "[::1]:{port}", "127.0.0.1:{port}"])
def test_usual_targets_are_accepted(target: str) -> None:
    """Host names and IPv6 literals pass validation and reach gRPC (nothing listens there)."""
    port = _closed_port().rpartition(":")[2]
    result = run(
        "check", "--token", "t", "--tool", "getInvoice", "--args", "{}",
        "--target", target.format(port=port), "--timeout", "5",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "UNAVAILABLE: " in result.stderr


def test_a_target_in_a_grpc_naming_scheme_is_passed_on() -> None:
    """dns:/// and unix: targets are gRPC's to resolve, not refused as HOST:PORT."""
    result = run(
        "check", "--token", "t", "--tool", "getInvoice", "--args", "{}",
        "--target", f"dns:///{_closed_port()}", "--timeout", "5",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "UNAVAILABLE: " in result.stderr
