"""Copy an exported lesion model (and its FP32 recheck partner) with another lesion rule in its
metadata, to judge a rule chosen on one model on another (docs/experiments.md, decision 17).

    python scripts/apply_lesion_rule.py MODEL-int8.onnx OUT_DIR --threshold 0.35 \\
        [--min-area 0] [--normal-gate 0.15] [--no-gate]

Only ``lesion_threshold``, ``lesion_min_area``, ``normal_rule`` and ``normal_gate`` change
(``edge_runtime.model.contract.ModelSpec``); the copies have no card, so the runtime does not check
their SHA-256. Not for shipping: a model's own rule is chosen by ``edge-train`` on its
validation split.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path

from edge_runtime.model.contract import NormalRule
from edge_runtime.model.session import open_model
from export.convert import write_metadata


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--threshold", type=float, required=True)
    parser.add_argument("--min-area", type=float, default=0.0)
    parser.add_argument("--normal-gate", type=float, default=0.0)
    parser.add_argument("--no-gate", action="store_true", help="the lesion_head rule")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    spec = open_model(args.model).spec
    paths = [args.model] + ([args.model.parent / spec.recheck_model] if spec.recheck_model else [])
    for path in paths:
        target = args.output / path.name
        shutil.copyfile(path, target)
        own = open_model(path).spec
        write_metadata(
            target,
            replace(
                own,
                lesion_threshold=args.threshold,
                lesion_min_area=args.min_area,
                normal_rule=NormalRule.LESION_HEAD
                if args.no_gate
                else (NormalRule.LESION_HEAD_OR_CLASSIFIER),
                normal_gate=0.0 if args.no_gate else args.normal_gate,
            ),
        )
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
