"""The serving process hides its start-up heap from the garbage collector."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import gc
from sidecar.app import freeze_startup_heap
from sidecar.policy.loader import load_policy
from pathlib import Path
policy = load_policy(Path("policies"))  # start-up's long-lived objects
before = len(gc.get_objects())
freeze_startup_heap()
gc.collect()
print(gc.get_freeze_count() >= before // 2, len(gc.get_objects()) < before // 10)
"""


def test_start_up_objects_are_frozen_so_a_full_collection_skips_them() -> None:
    """Run in a child: freezing is for the whole process, and tests start many Apps in one."""
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    assert probe.stdout.split() == ["True", "True"]
