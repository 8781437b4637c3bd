"""The v4 frontier's criteria (docs/prereg/2026-12-06b-v4-frontier.md, 1-4) on seed means.

usage: python scripts/frontier_criteria.py --baseline RUN [RUN ...] --candidate RUN [RUN ...]

Each RUN is a run folder (edge-train or training.ensemble) with metrics.json and protocol.json;
the baseline's and the candidate's runs are one per seed. Prints each criterion's numbers per
seed, the means, the bound the candidate's mean must meet, and pass or fail; exits 0 when every
criterion passes, 1 otherwise. docs/prereg/2026-12-06d-second-seed-and-v4-bundle.md's outcome is
this script's output for A (runs/v4/lite0-160, lite0-160-s1) against AB-m/lesion-A
(runs/v4/ab-160-m-la, ab-160-m-la-s1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import mean

from frontier_report import point

# (name, key of frontier_report.point, candidate mean >= baseline mean + offset, or <= when "<=")
CRITERIA = (
    ("1 BUSI out accuracy", "busi_out_accuracy", ">=", -0.03),
    ("1 BUSI out malignant AUC", "busi_out_malignant_auc", ">=", -0.02),
    ("1 BUSI out normal recall, mask head", "busi_out_normal_recall_mask", ">=", -0.05),
    ("2 BUS-BRA out mean malignant AUC", "busbra_out_auc_mean", ">=", 0.01),
    ("3 test normal recall as called", "test_normal_recall_called", ">=", -0.05),
    ("3 test lesion scans called normal", "test_lesion_called_normal", "<=", 0.02),
    ("3 test macro-F1 (top-1)", "test_macro_f1", ">=", -0.01),
    ("4 test BUSI Dice", "test_busi_dice", ">=", -0.02),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", nargs="+", type=Path, required=True)
    parser.add_argument("--candidate", nargs="+", type=Path, required=True)
    args = parser.parse_args(argv)
    baseline = [point(run) for run in args.baseline]
    candidate = [point(run) for run in args.candidate]
    passed = True
    for name, key, sense, offset in CRITERIA:
        base, cand = [p[key] for p in baseline], [p[key] for p in candidate]
        bound = mean(base) + offset
        ok = mean(cand) >= bound if sense == ">=" else mean(cand) <= bound
        passed &= ok
        print(
            f"{name}: baseline {' / '.join(f'{v:.3f}' for v in base)} ({mean(base):.3f}), "
            f"candidate {' / '.join(f'{v:.3f}' for v in cand)} ({mean(cand):.3f}), "
            f"{sense} {bound:.3f}: {'pass' if ok else 'FAIL'}"
        )
    print("every criterion passes" if passed else "not every criterion passes")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
