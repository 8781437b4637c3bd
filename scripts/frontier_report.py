"""The v4 frontier's table and plot (docs/frontier.md, docs/frontier.png) from its run folders.

usage: python scripts/frontier_report.py --latency LATENCY.json --plot OUT.png NAME=RUN [...]
           [--json OUT.json] [--previous EARLIER.json]

Per point (a run folder of edge-train or training.ensemble, each with its final model's
metrics.json and the scanner-held-out protocol.json), and the latency JSON that
scripts/frontier_latency.py wrote, prints a markdown table: the dev test split (top-1 accuracy,
macro-F1, malignant AUC; as the lesion rule calls: normal recall, lesion scans called normal;
lesion Dice on BUSI), the protocol (BUSI left out: accuracy, malignant AUC, normal recall and
lesion scans called normal with the mask head deciding; BUS-BRA scanners left out: malignant
AUC, and their mean), and INT8 latency as a ratio to the bundled model. Plots the mean BUS-BRA
left-out AUC and the test macro-F1 against that ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BUSI_FOLD = "busi:GE LOGIQ E9"


def point(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    protocol = json.loads((run / "protocol.json").read_text())
    lesion = metrics.get("lesion", {})
    busi = protocol.get(BUSI_FOLD, {})
    mask = busi.get("normal_by_mask_head", {})
    busbra = {
        k: v["malignant_auc"]["auc"] for k, v in sorted(protocol.items()) if k.startswith("busbra:")
    }
    return {
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "test_malignant_auc": metrics["malignant_auc"],
        "test_normal_recall_called": 1 - lesion["all"]["normal_with_lesion"]["mean"],
        "test_lesion_called_normal": lesion["all"]["lesion_called_normal"]["mean"],
        "test_busi_dice": lesion["by_source"]["busi"]["dice"]["mean"],
        "busi_out_accuracy": busi.get("accuracy"),
        "busi_out_malignant_auc": busi.get("malignant_auc", {}).get("auc"),
        "busi_out_normal_recall_mask": mask.get("normal_recall"),
        "busi_out_lesion_called_normal_mask": mask.get("lesion_scans_called_normal_rate"),
        "busbra_out_auc": busbra,
        "busbra_out_auc_mean": sum(busbra.values()) / len(busbra) if busbra else None,
    }


def table(points: dict[str, dict], latency: dict) -> str:
    def num(v) -> str:
        return "-" if v is None else f"{v:.3f}"

    head = (
        "| point | INT8 latency / v3 | INT8 MB | test acc. (top-1) | test macro-F1 | test mal. AUC "
        "| test normal recall (called) | test lesion scans called normal | test BUSI Dice "
        "| BUSI out: acc. | BUSI out: mal. AUC | BUSI out: normal recall | BUSI out: lesions "
        "called normal | BUS-BRA out: mal. AUC (Logiq 5, Logiq 7) | BUS-BRA out: mean |"
    )
    lines = [head, "|" + "---|" * 15]
    for name, p in points.items():
        lat = latency.get("models", {}).get(name, {})
        aucs = ", ".join(num(v) for v in p["busbra_out_auc"].values())
        lines.append(
            f"| {name} | {num(lat.get('ratio_to_bundled'))} | {num(lat.get('int8_mb'))} "
            f"| {num(p['test_accuracy'])} | {num(p['test_macro_f1'])} "
            f"| {num(p['test_malignant_auc'])} | {num(p['test_normal_recall_called'])} "
            f"| {num(p['test_lesion_called_normal'])} | {num(p['test_busi_dice'])} "
            f"| {num(p['busi_out_accuracy'])} | {num(p['busi_out_malignant_auc'])} "
            f"| {num(p['busi_out_normal_recall_mask'])} "
            f"| {num(p['busi_out_lesion_called_normal_mask'])} | {aucs} "
            f"| {num(p['busbra_out_auc_mean'])} |"
        )
    return "\n".join(lines) + "\n"


# label positions tried in turn (points from the dot, horizontal alignment): the first whose
# text overlaps no dot and no label already drawn, and stays inside the axes, is kept
LABEL_PLACES = (
    ((4, 4), "left"),
    ((4, -11), "left"),
    ((-4, 4), "right"),
    ((-4, -11), "right"),
    ((4, 12), "left"),
    ((4, -19), "left"),
)


def place_labels(ax, labelled: list[tuple[str, float, float]]) -> None:
    """Annotate each (name, x, y) of `labelled` on `ax` where its text overlaps no other dot or
    label."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    dots = ax.transData.transform([(x, y) for _, x, y in labelled])
    placed = [Bbox.from_extents(u - 4, v - 4, u + 4, v + 4) for u, v in dots]

    def draw(name: str, x: float, y: float, offset: tuple[int, int], align: str):
        text = ax.annotate(
            name, (x, y), textcoords="offset points", xytext=offset, fontsize=8, ha=align
        )
        return text, text.get_window_extent(renderer)

    for name, x, y in labelled:
        for offset, align in LABEL_PLACES:
            text, box = draw(name, x, y, offset, align)
            clear = not any(box.overlaps(other) for other in placed)
            if clear and inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1):
                break
            text.remove()
        else:  # nowhere clear: the first place
            text, box = draw(name, x, y, *LABEL_PLACES[0])
        placed.append(box)


def plot(points: dict[str, dict], latency: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "busbra_out_auc_mean", "malignant AUC, BUS-BRA scanners left out (mean)"),
        (axes[1], "test_macro_f1", "macro-F1, dev test split (top-1)"),
    ):
        labelled = []
        for name, p in points.items():
            ratio = latency.get("models", {}).get(name, {}).get("ratio_to_bundled")
            if ratio is None or p[key] is None:
                continue
            ax.scatter(ratio, p[key], color="tab:red" if name == "A" else "tab:blue")
            labelled.append((name, ratio, p[key]))
        ax.axvline(1.0, color="gray", ls=":", lw=1)
        ax.set_xlabel("INT8 latency, batch 1, one thread (x bundled v3)")
        ax.set_ylabel(label)
        ax.scatter(1.0, points.get("A", {}).get(key, float("nan")), marker="x", color="k")
        fig.tight_layout()  # fixes the axes' limits and size before the labels are measured
        place_labels(ax, labelled)
    fig.suptitle("v4 frontier, seed 0 (x: bundled v3 at latency 1.0, drawn at its recipe A)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN")
    parser.add_argument("--latency", type=Path, required=True)
    parser.add_argument("--plot", type=Path, required=True)
    parser.add_argument("--json", type=Path, help="also write every point's numbers here")
    parser.add_argument(
        "--previous",
        type=Path,
        help="an earlier --json whose points (and latencies) are kept where RUN names no new one",
    )
    args = parser.parse_args(argv)
    latency = json.loads(args.latency.read_text())
    points = {name: point(Path(run)) for name, run in (r.split("=", 1) for r in args.runs)}
    if args.previous:
        earlier = json.loads(args.previous.read_text())
        points = {**earlier["points"], **points}
        latency = {**latency, "models": {**earlier["latency"]["models"], **latency["models"]}}
    plot(points, latency, args.plot)
    if args.json:
        args.json.write_text(json.dumps({"points": points, "latency": latency}, indent=2) + "\n")
    print(table(points, latency), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
