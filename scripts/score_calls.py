"""Score ``edge-classify --format jsonl`` output against the class folder each scan lies in
(``<class>/<file>``, as BUSI's): accuracy, normal recall, malignant sensitivity, normal scans
with a lesion drawn, malignant AUC among lesion scans, and the confusion matrix (rows true).

    xargs -d '\\n' -a FILES.txt edge-classify --model M.onnx --format jsonl --output calls.jsonl
    python scripts/score_calls.py calls.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sklearn.metrics import roc_auc_score

CLASSES = ("normal", "benign", "malignant")


def main() -> None:
    for name in sys.argv[1:]:
        records = [json.loads(line) for line in Path(name).read_text().splitlines()]
        truth = [Path(r["path"]).parent.name for r in records]
        matrix = [[0] * len(CLASSES) for _ in CLASSES]
        for t, r in zip(truth, records, strict=True):
            matrix[CLASSES.index(t)][CLASSES.index(r["label"])] += 1
        normals = [r for t, r in zip(truth, records, strict=True) if t == "normal"]
        drawn = sum(r.get("lesion_bbox") is not None for r in normals)
        lesion = [(t, r) for t, r in zip(truth, records, strict=True) if t != "normal"]
        auc = roc_auc_score(
            [t == "malignant" for t, _ in lesion],
            [r["probabilities"]["malignant"] for _, r in lesion],
        )
        print(
            f"{name}: {len(records)} scans, accuracy "
            f"{sum(matrix[i][i] for i in range(3)) / len(records):.3f}, normal recall "
            f"{matrix[0][0] / sum(matrix[0]):.3f}, malignant sensitivity "
            f"{matrix[2][2] / sum(matrix[2]):.3f}, normals with a lesion {drawn}/{len(normals)}, "
            f"malignant AUC {auc:.3f}, confusion {matrix}"
        )


if __name__ == "__main__":
    main()
