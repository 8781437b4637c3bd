"""The frontier plot's labels (scripts/frontier_report.py) stay readable where points crowd."""

import importlib.util
from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "frontier_report.py"


def load_report():
    spec = importlib.util.spec_from_file_location("frontier_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_labels_of_points_at_one_height_do_not_overlap():
    import matplotlib.pyplot as plt

    report = load_report()
    fig, ax = plt.subplots(figsize=(5, 4))
    # two long names side by side at one height, as AB224/lesion-A and AB256/lesion-A stood
    labelled = [("AB224/lesion-A", 4.4, 0.775), ("B", 1.5, 0.79), ("AB256/lesion-A", 5.5, 0.775)]
    for _, x, y in labelled:
        ax.scatter(x, y)
    ax.set_xlim(0, 7)
    ax.set_ylim(0.70, 0.83)
    fig.tight_layout()
    report.place_labels(ax, labelled)

    renderer = fig.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in ax.texts]
    assert [text.get_text() for text in ax.texts] == [name for name, _, _ in labelled]
    for i, box in enumerate(boxes):
        for other in boxes[i + 1 :]:
            assert not box.overlaps(other)
    plt.close(fig)
