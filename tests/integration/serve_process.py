"""`proviso serve` in its own process, started and stopped the same way by every test.

The server's stdout and stderr go to files, not pipes: a server that logs to a pipe nobody
reads blocks once the pipe is full, and reading a pipe line by line and then communicate() can
lose what the text wrapper had already buffered. Readiness is the banner in the stdout file.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

PROVISO = [sys.executable, "-m", "sidecar.cli"]
BANNER = re.compile(r"serving gRPC on (\S+)")
POLL_SECONDS = 0.05


@dataclass
class ServerProcess:
    """A running (or stopped) `proviso serve` and the files its output goes to."""

    process: subprocess.Popen[str]
    stdout_path: Path
    stderr_path: Path
    target: str = ""
    """HOST:PORT from the first banner line, once the server is ready."""
    banner: str = ""
    """The first ``banner_lines`` lines of stdout, each with its newline."""

    @property
    def stdout(self) -> str:
        """Everything written to stdout so far (all of it, once the process has exited)."""
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        """Everything written to stderr so far (all of it, once the process has exited)."""
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has been waited for; None while it runs."""
        return self.process.returncode

    def output(self) -> str:
        """stdout and stderr, labelled, for failure messages."""
        return f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"


@contextmanager
def serve_process(
    args: Sequence[str],
    *,
    directory: Path,
    command: Sequence[str] = PROVISO,
    banner_lines: int = 1,
    start_timeout: float = 30,
    stop_timeout: float = 30,
) -> Iterator[ServerProcess]:
    """Run ``[*command, "serve", *args]`` from the repository root until the block ends.

    Ready means stdout holds ``banner_lines`` complete lines, the first matching
    "serving gRPC on HOST:PORT"; the test fails (with the output) if the process exits first or
    ``start_timeout`` passes. On leaving the block a process still running gets SIGTERM; if it
    is not gone ``stop_timeout`` seconds later, its process group is SIGKILLed and the test
    fails. stdout and stderr stay readable afterwards, in ``serve-N.stdout`` and
    ``serve-N.stderr`` in ``directory``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = _unused_log_paths(directory)
    with stdout_path.open("w") as out, stderr_path.open("w") as err:
        process = subprocess.Popen(
            [*command, "serve", *args],
            cwd=ROOT, stdout=out, stderr=err, text=True, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    server = ServerProcess(process, stdout_path, stderr_path)
    try:
        server.banner = _wait_for_banner(server, banner_lines, start_timeout)
        match = BANNER.search(server.banner)
        assert match, server.banner
        server.target = match.group(1)
        yield server
    finally:
        _stop(server, stop_timeout)


def _unused_log_paths(directory: Path) -> tuple[Path, Path]:
    """serve-N.stdout and serve-N.stderr for the first N not yet used: a test that starts the
    server twice keeps both outputs."""
    for number in itertools.count(1):
        stdout_path = directory / f"serve-{number}.stdout"
        stderr_path = directory / f"serve-{number}.stderr"
        if not stdout_path.exists() and not stderr_path.exists():
            return stdout_path, stderr_path
    raise AssertionError("unreachable")  # pragma: no cover


def _wait_for_banner(server: ServerProcess, banner_lines: int, timeout: float) -> str:
    """The first ``banner_lines`` lines of stdout, once they are complete."""
    deadline = time.monotonic() + timeout
    while True:
        exited = server.process.poll() is not None  # before the read: then the read saw it all
        complete = server.stdout.split("\n")[:-1]
        if complete and not BANNER.search(complete[0]):
            pytest.fail(f"`proviso serve` did not start with its banner\n{server.output()}")
        if len(complete) >= banner_lines:
            return "".join(f"{line}\n" for line in complete[:banner_lines])
        if exited:
            pytest.fail(
                f"`proviso serve` exited with {server.returncode} before it was ready\n"
                f"{server.output()}"
            )
        if time.monotonic() >= deadline:
            pytest.fail(
                f"`proviso serve` printed no {banner_lines}-line banner within {timeout} s\n"
                f"{server.output()}"
            )
        time.sleep(POLL_SECONDS)


def _stop(server: ServerProcess, timeout: float) -> None:
    """SIGTERM a server still running; SIGKILL it (and any workers) and fail if it hangs."""
    process = server.process
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):  # its own session: server and workers
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(
            f"`proviso serve` did not stop within {timeout} s of SIGTERM; killed with SIGKILL\n"
            f"{server.output()}"
        )
