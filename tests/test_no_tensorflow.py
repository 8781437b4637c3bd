"""The device runtime never imports TensorFlow, Keras, or the training/export packages."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.onnx_models import make_contract_model

FORBIDDEN = ("tensorflow", "keras", "tf2onnx", "training", "export", "ray")


def test_runtime_classifies_in_a_fresh_interpreter_without_tensorflow(tmp_path):
    model = make_contract_model(tmp_path / "m.onnx")
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        import edge_runtime
        from edge_runtime.classifier import Classifier
        from edge_runtime.app.cli import main
        with Classifier.from_path({str(model)!r}) as clf:
            result = clf.classify([np.full((120, 90), 128, np.uint8)])[0]
        assert result.ok and result.label is not None, result
        loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})
        print(','.join(loaded))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"runtime imported: {done.stdout.strip()}"


def test_one_scan_from_the_cli_imports_nothing_only_other_paths_need(tmp_path):
    """A cold ``edge-classify one.png`` loads neither the watcher, the subcommands, DICOM support
    nor the TensorRT probe's helpers (each costs start-up time on every run)."""
    import cv2
    import numpy as np

    model = make_contract_model(tmp_path / "m.onnx")
    scan = tmp_path / "one.png"
    cv2.imwrite(str(scan), np.full((120, 90), 128, np.uint8))
    lazy = (
        "edge_runtime.app.watch",
        "edge_runtime.app.bench",
        "edge_runtime.io.dicom",
        "edge_runtime.adapt.run",
        "edge_runtime.app.dashboard",
        "pydicom",
        "ctypes.util",
        "difflib",
        "subprocess",
    )
    code = textwrap.dedent(f"""
        import sys
        from edge_runtime.app.cli import main
        assert main([{str(scan)!r}, "--model", {str(model)!r}, "--quiet"]) == 0
        print("loaded:" + ",".join(sorted(m for m in sys.modules if m in {lazy!r})))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "loaded:", done.stdout
