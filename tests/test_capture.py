"""What decoders print while reading a file is logged under that file's name, never raw."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


def png_with_a_bad_ancillary_crc(path: Path) -> Path:
    png = cv2.imencode(".png", np.full((40, 48), 90, np.uint8))[1].tobytes()
    bad = struct.pack(">I", 4) + b"tEXt" + b"ab\x00c" + b"\x00\x00\x00\x00"  # wrong CRC
    path.write_bytes(png[:33] + bad + png[33:])  # libpng warns, and decodes it
    return path


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """In a fresh process: the C libraries write to the process's own standard error."""
    return subprocess.run(
        [sys.executable, "-m", "edge_runtime.app.cli", *argv],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )


def test_a_libpng_warning_is_tied_to_its_file_and_silent_under_quiet(tmp_path):
    from tests.onnx_models import make_contract_model

    model = make_contract_model(tmp_path / "model.onnx")
    scan = png_with_a_bad_ancillary_crc(tmp_path / "odd.png")
    done = run_cli(str(scan), "--model", str(model), "--format", "jsonl")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "CRC" in line]
    assert lines == [f"edge-classify: {scan}: libpng warning: tEXt: CRC error"]
    quiet = run_cli(str(scan), "--model", str(model), "--format", "jsonl", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout.count("\n") == 1  # the record itself


def _decode_in_worker(path: Path) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    from edge_runtime.io.capture import collecting, private_stderr
    from edge_runtime.io.decode import load_gray

    def work() -> list[str]:
        with collecting() as notes:
            load_gray(path)
        return notes

    with ThreadPoolExecutor(1, initializer=private_stderr) as pool:
        return pool.submit(work).result()


def test_a_decode_worker_collects_the_messages_of_each_file(tmp_path):
    odd = png_with_a_bad_ancillary_crc(tmp_path / "odd.png")
    assert _decode_in_worker(odd) == ["libpng warning: tEXt: CRC error"]
    plain = tmp_path / "plain.png"
    cv2.imwrite(str(plain), np.zeros((40, 48), np.uint8))
    assert _decode_in_worker(plain) == []
