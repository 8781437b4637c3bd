"""The README's quick start images and its Python example, run as written."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from training.synthetic import main as synthetic_main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python() -> str:
    """The first ``python`` block after the README's ``## Python`` heading."""
    section = README.read_text().split("\n## Python\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_python_example_runs_on_the_quick_start_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert synthetic_main(["examples", "--per-class", "2"]) == 0  # the quick start's line
    (tmp_path / "examples" / "benign" / "empty.png").write_bytes(b"")  # one input that fails
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_python(), str(README), "exec"), {})
    lines = out.getvalue().splitlines()
    assert len(lines) == 7
    failed = [line for line in lines if "failed:" in line]
    assert failed == [f"{Path('examples/benign/empty.png')} failed: file is empty (0 bytes)"]
    for line in lines:
        if line not in failed:
            _, label, confidence, abstained = line.split()
            assert label in {"normal", "benign", "malignant"}
            assert 0.0 <= float(confidence) <= 1.0 and abstained in {"True", "False"}
