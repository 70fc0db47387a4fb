"""`proviso audit verify` on a real log written by a real sidecar under concurrent load.

The log comes from 300 concurrent Checks over gRPC with small checkpoint and rotation limits,
so it spans several files and checkpoints. Each tampering is applied to a copy and must be
reported at the line where it happened.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar._proto.proviso.v1 import authorization_service_pb2 as pb
from sidecar.app import App
from sidecar.audit.chain import Problem, parse_line, seal
from sidecar.audit.files import log_files, verify_log
from tests.conftest import ROOT, Sidecar, make_settings
from tests.integration.test_check import INVOICE_CONTEXT, refund
from tokens import VerificationKeys

CHECKS = 300


@dataclass(frozen=True)
class RecordedLog:
    """A sidecar's audit directory and the public keys of its checkpoints."""

    directory: Path
    jwks: Path
    allowed: frozenset[str]

    @property
    def keys(self) -> VerificationKeys:
        return VerificationKeys.from_jwks(json.loads(self.jwks.read_text()))


async def _record(state_dir: Path) -> tuple[frozenset[str], dict[str, object]]:
    settings = make_settings(state_dir, audit_checkpoint_every=40, audit_max_file_bytes=120_000)
    sidecar = Sidecar.connect(await App.start(settings))
    try:
        token = sidecar.token()
        semaphore = asyncio.Semaphore(16)

        async def one(i: int) -> pb.CheckResponse:
            async with semaphore:
                amount = ("10", "120", "9000")[i % 3]
                return await sidecar.authz.Check(
                    pb.CheckRequest(
                        token=token, tool="requestRefund", arguments_json=refund(amount),
                        run_id=f"run-{i}", context_json=INVOICE_CONTEXT,
                        idempotency_key=f"k-{i}",
                    )
                )  # fmt: skip

        responses = await asyncio.gather(*(one(i) for i in range(CHECKS)))
        jwks = sidecar.app.keys.verification_keys().to_jwks()
    finally:
        await sidecar.close()
    allowed = frozenset(r.decision_id for r in responses if r.decision == pb.DECISION_ALLOW)
    return allowed, jwks


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> RecordedLog:
    """One log written under concurrent load, then the sidecar stopped cleanly."""
    state_dir = tmp_path_factory.mktemp("loaded") / "state"
    allowed, jwks = asyncio.run(_record(state_dir))
    jwks_path = state_dir.parent / "jwks.json"
    jwks_path.write_text(json.dumps(jwks))
    return RecordedLog(state_dir / "audit", jwks_path, allowed)


def proviso(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_the_loaded_log_verifies_across_files_and_checkpoints(recorded: RecordedLog) -> None:
    """Every record of the concurrent run is chained and sealed, across several files."""
    files = log_files(recorded.directory)
    result = verify_log(files, recorded.keys)
    assert result.broken is None
    assert len(files) >= 3
    assert result.state.records == CHECKS + CHECKS // 3, "decisions and approval requests"
    assert result.state.checkpoints >= CHECKS // 40
    assert result.state.unsealed == 0, "a clean stop ends with a checkpoint"
    seen = {
        record["record_id"]
        for path in files
        for record in map(json.loads, path.read_text().splitlines())
        if record["kind"] == "decision"
    }
    assert recorded.allowed <= seen


def test_the_cli_verifies_with_published_keys(recorded: RecordedLog) -> None:
    """`proviso audit verify DIR --jwks FILE --require-sealed` exits 0 and says what it proved."""
    result = proviso(
        "audit", "verify", str(recorded.directory), "--jwks", str(recorded.jwks),
        "--require-sealed", "--format", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["records"] == CHECKS + CHECKS // 3
    assert report["break"] is None


Lines = list[bytes]


def edit_field(lines: Lines) -> Lines:
    """Change what line 5 says, as someone covering their tracks might: a decision's outcome,
    or the actor of an approval event (the order of concurrent records is not fixed)."""
    record = json.loads(lines[4])
    field = "decision" if "decision" in record else "actor"
    was = record[field]
    other = "DENY" if was == "ALLOW" else "ALLOW"
    lines[4] = lines[4].replace(f'"{field}":"{was}"'.encode(), f'"{field}":"{other}"'.encode())
    return lines


def delete_line(lines: Lines) -> Lines:
    del lines[4]
    return lines


def swap_lines(lines: Lines) -> Lines:
    lines[4], lines[5] = lines[5], lines[4]
    return lines


def insert_copy(lines: Lines) -> Lines:
    """Replay an old record (line 2) at line 5, as an attacker hiding a call might."""
    lines.insert(4, lines[1])
    return lines


def forged(lines: Lines) -> bytes:
    """A record that chains perfectly after line 4: right seq, right prev, a valid hash."""
    before = parse_line(lines[3].rstrip(b"\n"))
    body = {k: v for k, v in parse_line(lines[4].rstrip(b"\n")).items()
            if k not in ("seq", "prev", "hash")}  # fmt: skip
    body["record_id"] = "dec_forged"
    return seal(body, seq=before["seq"] + 1, prev=before["hash"]).line


def insert_chained_forgery(lines: Lines) -> Lines:
    lines.insert(4, forged(lines))
    return lines


def rewrite_chain_after_forgery(lines: Lines) -> Lines:
    """Insert a forgery and re-seal everything after it: only a signature can catch this."""
    rewritten = [*lines[:4], forged(lines)]
    for line in lines[4:]:
        record = parse_line(line.rstrip(b"\n"))
        before = parse_line(rewritten[-1].rstrip(b"\n"))
        body = {k: v for k, v in record.items() if k not in ("seq", "prev", "hash")}
        if body["kind"] == "checkpoint":
            body["last_seq"] = before["seq"]  # keep the range right; the signature still fails
        rewritten.append(seal(body, seq=before["seq"] + 1, prev=before["hash"]).line)
    return rewritten


def last_written(directory: Path) -> Path:
    """The last file holding records (the active file may be empty right after a rotation)."""
    return [path for path in log_files(directory) if path.stat().st_size][-1]


def checkpoint_line(lines: Lines) -> int:
    return next(i for i, line in enumerate(lines, 1) if b'"kind":"checkpoint"' in line)


@pytest.mark.parametrize(
    ("tamper", "line", "problem"),
    [
        (edit_field, lambda _: 5, Problem.HASH_MISMATCH),
        (delete_line, lambda _: 5, Problem.MISSING_RECORDS),
        (swap_lines, lambda _: 5, Problem.MISSING_RECORDS),
        (insert_copy, lambda _: 5, Problem.OUT_OF_ORDER),
        (insert_chained_forgery, lambda _: 6, Problem.OUT_OF_ORDER),
        (rewrite_chain_after_forgery, lambda lines: checkpoint_line(lines) + 1,
         Problem.BAD_SIGNATURE),
    ],
)  # fmt: skip
def test_tampering_is_found_at_its_line(
    recorded: RecordedLog,
    tmp_path: Path,
    tamper: Callable[[Lines], Lines],
    line: Callable[[Lines], int],
    problem: Problem,
) -> None:
    """Editing, deleting, swapping, replaying or forging a line breaks the chain right there."""
    directory = shutil.copytree(recorded.directory, tmp_path / "audit")
    target = log_files(directory)[0]
    lines = target.read_bytes().splitlines(keepends=True)
    expected_line = line(lines)
    target.write_bytes(b"".join(tamper(lines)))
    broken = verify_log(log_files(directory), recorded.keys).broken
    assert broken is not None
    assert (Path(broken.file).name, broken.line, broken.problem) == (
        target.name,
        expected_line,
        problem,
    )


def test_a_truncated_file_is_found_at_its_last_line(recorded: RecordedLog, tmp_path: Path) -> None:
    """A log cut mid-line (a truncated file) breaks at that incomplete line."""
    directory = shutil.copytree(recorded.directory, tmp_path / "audit")
    active = last_written(directory)
    data = active.read_bytes()
    active.write_bytes(data[:-10])
    broken = verify_log(log_files(directory), recorded.keys).broken
    assert broken is not None
    assert (broken.file, broken.line, broken.problem) == (
        str(active),
        data.count(b"\n"),
        Problem.TRUNCATED,
    )


def test_a_deleted_file_is_found_where_the_chain_resumes(
    recorded: RecordedLog, tmp_path: Path
) -> None:
    """Removing a whole rotated file breaks the chain at the first line of the next one."""
    directory = shutil.copytree(recorded.directory, tmp_path / "audit")
    files = log_files(directory)
    files[1].unlink()
    broken = verify_log(log_files(directory), recorded.keys).broken
    assert broken is not None
    assert (broken.file, broken.line, broken.problem) == (
        str(files[2]),
        1,
        Problem.MISSING_RECORDS,
    )


def test_a_cut_tail_shows_as_unsealed_and_fails_when_sealing_is_required(
    recorded: RecordedLog, tmp_path: Path
) -> None:
    """Whole lines cut off the end leave records after the last checkpoint: reported, exit 1."""
    directory = shutil.copytree(recorded.directory, tmp_path / "audit")
    active = last_written(directory)
    lines = active.read_bytes().splitlines(keepends=True)
    active.write_bytes(b"".join(lines[:-1]))  # drop the closing checkpoint
    loose = proviso("audit", "verify", str(directory), "--jwks", str(recorded.jwks))
    assert loose.returncode == 0, loose.stdout + loose.stderr
    assert "follow the last checkpoint" in loose.stdout
    strict = proviso(
        "audit", "verify", str(directory), "--jwks", str(recorded.jwks), "--require-sealed"
    )
    assert strict.returncode == 1
    assert "error:" in strict.stdout


def test_the_cli_names_the_broken_line_and_exits_1(recorded: RecordedLog, tmp_path: Path) -> None:
    """A tampered log makes `proviso audit verify` print file:line and the problem, exit 1."""
    directory = shutil.copytree(recorded.directory, tmp_path / "audit")
    target = log_files(directory)[0]
    target.write_bytes(b"".join(delete_line(target.read_bytes().splitlines(keepends=True))))
    result = proviso("audit", "verify", str(directory), "--jwks", str(recorded.jwks))
    assert result.returncode == 1
    assert f"BROKEN at {target}:5: MISSING_RECORDS" in result.stdout


def test_verify_without_keys_is_a_usage_error(recorded: RecordedLog, tmp_path: Path) -> None:
    """Checkpoints cannot be proven without keys: exit 2 rather than a false 'ok'."""
    result = proviso("audit", "verify", str(recorded.directory), "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert "no keys" in result.stderr
