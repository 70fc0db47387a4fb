"""Where an audit log's lines live on disk, and reading them back.

A log is one active file (``decisions.jsonl``) plus the segments rotated out of it, named after
the ``seq`` of their first record (``decisions.000000000001.jsonl``), so sorting the names sorts
the chain. Readers never write; the writer is the only one that appends, truncates or renames.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.audit.chain import Break, ChainState, ChainVerifier, parse_line
from tokens import VerificationKeys

SEQ_DIGITS = 12
_SEGMENT_RE = re.compile(rf"(?P<stem>.+)\.(?P<seq>\d{{{SEQ_DIGITS}}})")


class AuditLogNotFoundError(FileNotFoundError):
    """No audit log at the given path."""


def log_stem(path: Path) -> str:
    """The name of the log a file belongs to: its stem, without a rotated segment's first
    seq (``decisions.w0.000000000001.jsonl`` and ``decisions.w0.jsonl``: ``decisions.w0``)."""
    match = _SEGMENT_RE.fullmatch(path.stem)
    return match["stem"] if match else path.stem


def segment_path(active: Path, first_seq: int) -> Path:
    """Where the active file goes when it is rotated, its first record being ``first_seq``."""
    return active.with_name(f"{active.stem}.{first_seq:0{SEQ_DIGITS}d}{active.suffix}")


def segments(active: Path) -> list[Path]:
    """The rotated segments of the log whose active file is ``active``, oldest first."""
    if not active.parent.is_dir():
        return []
    found = []
    for candidate in active.parent.glob(f"{active.stem}.*{active.suffix}"):
        match = _SEGMENT_RE.fullmatch(candidate.name[: len(candidate.name) - len(active.suffix)])
        if match and match["stem"] == active.stem and candidate.is_file():
            found.append(candidate)
    return sorted(found)


def log_files(path: Path) -> list[Path]:
    """Every file of the log at ``path``, in chain order.

    ``path`` is the active file, or a directory holding one log (its one active ``*.jsonl``).

    Raises:
        AuditLogNotFoundError: nothing there, or a directory holding several logs.
    """
    if path.is_dir():
        stems = {log_stem(p) for p in path.glob("*.jsonl")}
        if len(stems) != 1:
            what = "no audit log" if not stems else f"{len(stems)} audit logs"
            raise AuditLogNotFoundError(f"{what} in {path}; name the file")
        path = path / f"{stems.pop()}.jsonl"
    files = segments(path)
    if path.is_file() or (path.exists() and not path.is_dir()):
        files.append(path)
    if not files:
        raise AuditLogNotFoundError(f"no audit log at {path}")
    return files


def logs(path: Path) -> list[list[Path]]:
    """Every log at ``path``, each as its files in chain order.

    ``path`` is one log's active file, or a directory: then every log in it, one per stem
    (``serve --workers N`` writes one chain per worker process: ``decisions.w0.jsonl``…).

    Raises:
        AuditLogNotFoundError: no log there.
    """
    if not path.is_dir():
        return [log_files(path)]
    stems = sorted({log_stem(p) for p in path.glob("*.jsonl")})
    if not stems:
        raise AuditLogNotFoundError(f"no audit log in {path}")
    return [log_files(path / f"{stem}.jsonl") for stem in stems]


def lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """``(line number, bytes without the newline, complete)`` for each line of a file."""
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, 1):
            complete = raw.endswith(b"\n")
            yield number, raw[:-1] if complete else raw, complete


@dataclass(frozen=True, slots=True)
class Verification:
    """What ``verify_log`` found: the state reached, and the first break if any."""

    files: tuple[Path, ...]
    state: ChainState
    broken: Break | None


def verify_log(files: list[Path], keys: VerificationKeys | None) -> Verification:
    """Check every line of the log, in order, stopping at the first break."""
    verifier = ChainVerifier(keys)
    for path in files:
        for number, raw, complete in lines(path):
            if verifier.feed(raw, file=str(path), line=number, complete=complete):
                return Verification(tuple(files), verifier.state, verifier.broken)
    return Verification(tuple(files), verifier.state, None)


def records(files: list[Path]) -> Iterator[dict[str, Any]]:
    """Every complete, readable record of the log, in order. Does not verify the chain.

    An incomplete last line (a write in progress, or a crash) and unreadable lines are
    skipped: ``proviso audit verify`` is the tool that says whether the log can be trusted.
    """
    for path in files:
        for _, raw, complete in lines(path):
            if not complete:
                continue
            try:
                yield parse_line(raw)
            except (ValueError, RecursionError):
                continue
