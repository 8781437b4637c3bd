"""The repository commits no file over 20 MB (the bundled models included)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from export.bundle import MAX_FILE_BYTES

ROOT = Path(__file__).resolve().parents[1]


def test_no_tracked_file_is_over_the_limit():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no list of committed files")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    paths = [ROOT / name.decode() for name in listed if name]
    sizes = {p.relative_to(ROOT).as_posix(): p.stat().st_size for p in paths if p.is_file()}
    assert sizes, "git ls-files listed nothing"
    over = {name: size for name, size in sizes.items() if size > MAX_FILE_BYTES}
    assert not over, f"files over {MAX_FILE_BYTES:,} bytes: {over}"
    assert "edge_runtime/models/default-fp32.onnx" in sizes
