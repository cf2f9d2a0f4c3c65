"""Shared test helpers: running the ``metagrad`` command in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def metagrad_command(*args: str) -> list[str]:
    """The argv of ``python -m metagrad ARGS`` with this interpreter."""
    return [sys.executable, "-m", "metagrad", *args]


def metagrad_env() -> dict[str, str]:
    """The environment for a ``metagrad`` subprocess: the source tree importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def run_metagrad():
    """Run ``python -m metagrad ARGS`` to completion; returns the ``CompletedProcess``."""

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            metagrad_command(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=metagrad_env(),
        )

    return run
