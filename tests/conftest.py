"""Shared fixtures: where the real data lives, and a skip with a reason when it does not."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGE_CLASSIFY_SHARED", REPO_ROOT.parent / "shared"))
BUSI_ROOT = SHARED / "data" / "busi" / "Dataset_BUSI_with_GT"
BUSBRA_ROOT = SHARED / "data" / "busbra"


def pytest_configure(config) -> None:
    """Ctrl-C reaches the commands the tests start and interrupt, however pytest was started.

    A shell without job control starts a background job (``pytest tests &``) with SIGINT
    ignored; an ignored signal is inherited across exec, and Python installs no
    KeyboardInterrupt handler where it starts ignored, so the tests that send SIGINT to a
    command (dashboard, watch, node, Ray, edge-train) would wait for an exit that never comes.
    A handler (not an ignore) is reset to the default in each child.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Optimized graphs go to a folder of the test run, not the user's cache (every session
    opened twice then loads its cached graph, as on a device host)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGE_CLASSIFY_CACHE", str(tmp_path_factory.mktemp("session-cache")))
        yield


def _require(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(
            f"real data not found at {path}: put the shared data folder beside the repository "
            "(or set EDGE_CLASSIFY_SHARED) to run this test"
        )
    return path


@pytest.fixture(scope="session")
def busi_root() -> Path:
    """The BUSI release folder, or skip."""
    return _require(BUSI_ROOT)


@pytest.fixture(scope="session")
def busbra_root() -> Path:
    """The BUS-BRA folder, or skip."""
    return _require(BUSBRA_ROOT)
