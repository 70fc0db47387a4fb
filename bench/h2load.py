"""Drive one scenario with h2load (nghttp2's C load generator) and read back what it measured.

h2load keeps ``connections x streams`` requests in flight (a closed loop: a stream that ends
starts the next request), sends the same pre-framed gRPC body each time, and writes one line
per request to a log file (start time, HTTP status, microseconds until the end of the
response). It costs a small fraction of the CPU a Python gRPC client needs per call, so on a
small machine the server gets nearly all of the CPU. h2load cannot read gRPC trailers: whether
the answers were right is checked on the server's own metrics (``bench.run``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

H2LOAD = "h2load"
_REQUESTS_RE = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_VERSION_RE = re.compile(r"nghttp2/(\S+)")


class H2LoadError(RuntimeError):
    """h2load failed or printed something this module does not understand."""


def find() -> str | None:
    """The path of h2load, or None when it is not installed."""
    return shutil.which(H2LOAD)


def version(path: str) -> str:
    """h2load's version line, e.g. ``nghttp2/1.52.0``."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    match = _VERSION_RE.search(out)
    return f"nghttp2/{match.group(1)}" if match else out.strip()


@dataclass(frozen=True, slots=True)
class Run:
    """What one h2load run measured."""

    succeeded: int
    started: int
    failed: int
    latencies_us: list[int]
    seconds: float

    @property
    def calls_per_s(self) -> float:
        return self.succeeded / self.seconds


def run(
    path: str,
    url: str,
    body: Path,
    *,
    connections: int,
    streams: int,
    seconds: float,
    timeout_s: float,
) -> Run:
    """Run h2load for ``seconds`` against ``url`` (a gRPC method's full URL).

    Raises:
        H2LoadError: h2load exited with an error or its summary could not be read.
    """
    with tempfile.TemporaryDirectory(prefix="proviso-h2load-") as scratch:
        log = Path(scratch) / "requests.tsv"
        command = [
            path,
            f"--duration={seconds:g}",
            f"--clients={connections}",
            f"--max-concurrent-streams={streams}",
            f"--data={body}",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
            f"--log-file={log}",
            url,
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=seconds + timeout_s
        )
        summary = _REQUESTS_RE.search(done.stdout)
        if done.returncode != 0 or summary is None:
            raise H2LoadError(
                f"h2load exited with status {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        latencies = []
        with log.open() as lines:
            for line in lines:
                _, status, micros = line.split("\t")
                if status == "200":
                    latencies.append(int(micros))
    succeeded, started = int(summary.group(4)), int(summary.group(2))
    failed = int(summary.group(5)) + int(summary.group(6))
    return Run(succeeded, started, failed, latencies, seconds)
