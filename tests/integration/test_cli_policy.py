"""`proviso serve` reloading on SIGHUP, and `proviso policy show|reload` as an admin would."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.serve_process import serve_process
from tests.integration.test_cli import run
from tests.integration.test_cli_errors import run_into_a_closed_pipe
from tests.integration.test_reload import copy_bundle, set_variant, write


@dataclass
class Served:
    """A `proviso serve` process on a private bundle and state directory."""

    process: subprocess.Popen[str]
    target: str
    bundle: Path
    state: Path

    def policy(
        self, *args: str, identity: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """Run `proviso policy ARGS` against this server, as the admin by default."""
        who = identity or ("--as", "olivia@example.com")
        return run(
            "policy", *args, "--target", self.target, *who,
            "--state-dir", str(self.state), "--policies", str(self.bundle),
        )  # fmt: skip

    def version(self) -> str:
        shown = self.policy("show", "--format", "json")
        assert shown.returncode == 0, shown.stderr
        version: str = json.loads(shown.stdout)["policy"]["version"]
        return version


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """`proviso serve` with the watcher off, so only SIGHUP or ReloadPolicy reload."""
    bundle = copy_bundle(tmp_path / "bundle")
    state = tmp_path / "state"
    with serve_process(
        [
            "--policies", str(bundle), "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0", "--state-dir", str(state),
            "--watch-interval", "0", "--workers", "1",
        ],
        directory=tmp_path, stop_timeout=20,
    ) as server:  # fmt: skip
        assert re.fullmatch(r"127\.0\.0\.1:\d+", server.target), server.banner
        yield Served(server.process, server.target, bundle, state)


def test_policy_show_names_the_version_in_force(served: Served) -> None:
    """`proviso policy show --as` an admin prints the version, label, files and tools."""
    shown = served.policy("show")
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^version  [0-9a-f]{16}$", shown.stdout, re.M), shown.stdout
    assert "label    examples-2026-11" in shown.stdout
    assert "requestRefund" in shown.stdout
    denied = served.policy("show", identity=("--as", "alice@example.com"))
    assert denied.returncode == 1
    assert "PERMISSION_DENIED" in denied.stderr
    nobody = served.policy("show", identity=("--as", "mallory@example.com"))
    assert nobody.returncode == 2
    assert "not in the dev_directory" in nobody.stderr


def test_sighup_reloads_the_policy(served: Served) -> None:
    """After an edit, SIGHUP makes the server load the new version."""
    before = served.version()
    set_variant(served.bundle, auto_limit=100, label="after-sighup")
    served.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while served.version() == before:
        assert time.monotonic() < deadline, "SIGHUP did not reload"
        time.sleep(0.1)
    assert "label    after-sighup" in served.policy("show").stdout


def test_policy_reload_reports_errors_with_file_and_line(served: Served) -> None:
    """`proviso policy reload` on a broken edit exits 1 with file:line; the old version stays."""
    before = served.version()
    billing = served.bundle / "billing.yaml"
    write(billing, billing.read_text().replace("    roles: [billing-resolution]", "    rolez: []"))
    refused = served.policy("reload")
    assert refused.returncode == 1
    assert "billing.yaml:4:5: error UNKNOWN_FIELD" in refused.stderr
    assert "FAILED_PRECONDITION" in refused.stderr
    as_json = served.policy("reload", "--format", "json")
    assert as_json.returncode == 1
    error = json.loads(as_json.stdout)["error"]
    assert error["code"] == "FAILED_PRECONDITION"
    assert ("billing.yaml:4:5", "UNKNOWN_FIELD") in {
        (v["subject"], v["type"]) for v in error["violations"]
    }, error
    assert served.version() == before
    write(billing, billing.read_text().replace("    rolez: []", "    roles: [billing-resolution]"))
    fixed = served.policy("reload")
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.startswith("unchanged: version " + before)


def test_policy_show_into_head_stops_quietly(served: Served) -> None:
    """`proviso policy show | head -1`: once the reader is gone the command stops, exit 141,
    with no BrokenPipeError traceback."""
    result = run_into_a_closed_pipe(
        "policy", "show", "--target", served.target, "--as", "olivia@example.com",
        "--state-dir", str(served.state), "--policies", str(served.bundle), buffered=True,
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (141, "")
