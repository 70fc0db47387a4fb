"""Hot reload: load a bundle off the event loop, then swap it in whole, or keep the old one.

Three triggers share one path: the directory watcher (a poll of the bundle's content hash),
SIGHUP, and ``AdminService.ReloadPolicy``. Loading, validating and compiling happen in a worker
thread, so Checks keep being answered meanwhile; the swap is one reference assignment in
``PolicyHolder``. A bundle with errors is refused with every issue (file:line) in the log and
``proviso_policy_reload_total{result="error"}``; the version in force keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from sidecar.authorizer import LoadedPolicy, PolicyHolder
from sidecar.clock import Clock
from sidecar.errors import PolicyLoadError
from sidecar.observability.metrics import Metrics
from sidecar.policy.issues import Code, PolicyIssue
from sidecar.policy.loader import bundle_fingerprint, load_policy
from sidecar.policy.model import Policy

log = logging.getLogger("proviso.reload")
MAX_LOGGED_ISSUES = 100
"""The first issues of a refused bundle go in the log line (``issue_count`` says how many
there are; ``proviso lint`` lists them all): a file of 200,000 duplicate keys made one line of
tens of megabytes."""

LOAD_ATTEMPTS = 3
"""A bundle that changes while it is read is read again, at most this many times in all."""


class ReloadResult(StrEnum):
    """The ``result`` label of ``proviso_policy_reload_total``."""

    SUCCESS = "success"
    UNCHANGED = "unchanged"
    ERROR = "error"


class PolicyReloader:
    """Reloads one bundle directory into one holder (the active policy, or the shadow)."""

    def __init__(
        self,
        directory: Path,
        holder: PolicyHolder,
        metrics: Metrics,
        clock: Clock,
        *,
        bundle: str = "active",
        on_swap: Callable[[Policy], None] = lambda policy: None,
    ) -> None:
        self.directory = directory
        self._holder = holder
        self._metrics = metrics
        self._clock = clock
        self._bundle = bundle
        self._on_swap = on_swap
        self._lock = asyncio.Lock()

    async def reload(self, trigger: str) -> tuple[LoadedPolicy, bool]:
        """Load the directory again and swap the result in if its version is new.

        Returns the policy in force afterwards and whether it changed.

        Raises:
            PolicyLoadError: the bundle has errors; nothing was swapped.
        """
        async with self._lock:  # one reload at a time; Checks never wait on this lock
            before = self._holder.current
            try:
                policy = await asyncio.to_thread(self._load_settled)
            except PolicyLoadError as exc:
                self._metrics.policy_reloads.labels(self._bundle, ReloadResult.ERROR).inc()
                log.error(
                    "policy reload refused; the previous version keeps serving",
                    extra={
                        "bundle": self._bundle,
                        "directory": str(self.directory),
                        "trigger": trigger,
                        "serving_version": before.version,
                        "issues": [str(issue) for issue in exc.issues[:MAX_LOGGED_ISSUES]],
                        "issue_count": len(exc.issues),
                    },
                )
                raise
            if policy.version == before.version:
                self._metrics.policy_reloads.labels(self._bundle, ReloadResult.UNCHANGED).inc()
                return self._holder.snapshot(), False
            self._holder.swap(policy, self._clock.now())
            self._on_swap(policy)
            self._metrics.policy_reloads.labels(self._bundle, ReloadResult.SUCCESS).inc()
            log.info(
                "policy reloaded",
                extra={
                    "bundle": self._bundle,
                    "trigger": trigger,
                    "previous_version": before.version,
                    "version": policy.version,
                    "label": policy.label,
                },
            )
            return self._holder.snapshot(), True

    def _load_settled(self) -> Policy:
        """Load, then check the files still hash to what was loaded (no edit landed midway).

        An editor or a deploy may be rewriting several files while we read them; a mix of old
        and new files could be a valid bundle that nobody wrote. Such a load is discarded. So
        is a refusal of what an edit in progress left (a file truncated, half written): it is
        not what the directory holds, and the watcher would not try that content again.
        """
        for _ in range(LOAD_ATTEMPTS):
            try:
                policy = load_policy(self.directory)
            except PolicyLoadError as exc:
                if exc.version and bundle_fingerprint(self.directory) != exc.version:
                    continue
                raise
            if bundle_fingerprint(self.directory) == policy.version:
                return policy
        message = "the bundle kept changing while it was read; not swapped (try again)"
        raise PolicyLoadError((PolicyIssue(".", 0, 0, Code.READ_ERROR, message),))

    def request(self, trigger: str) -> asyncio.Task[None]:
        """Reload in the background (for a signal handler); failures are logged, not raised."""
        return asyncio.get_running_loop().create_task(self._reload_quietly(trigger))

    async def _reload_quietly(self, trigger: str) -> None:
        try:
            await self.reload(trigger)
        except PolicyLoadError:
            pass  # already logged and counted by reload
        except Exception:
            log.exception("policy reload failed", extra={"bundle": self._bundle})

    async def watch(self, interval_seconds: float) -> None:
        """Poll the bundle's content hash and reload when it changed and then held still.

        Hashing reads the files but parses nothing, in a worker thread. A change is acted on
        once the same content is seen on two polls in a row, so a save in progress is not
        loaded half-written; content that failed to load is not retried until it changes.
        Runs until cancelled.
        """
        previous = refused = ""
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                seen = await asyncio.to_thread(bundle_fingerprint, self.directory)
            except OSError as exc:
                log.warning(
                    "cannot read the policy directory", extra={"error": str(exc)}
                )  # the version in force keeps serving; try again on the next poll
                continue
            settled, previous = seen == previous, seen
            if seen in (self._holder.current.version, refused) or not settled:
                continue
            try:
                await self.reload("watch")
            except PolicyLoadError:
                refused = seen
            except Exception:
                log.exception("policy reload failed", extra={"bundle": self._bundle})
