"""Stand-in for a new scanner: adapt on 10 labelled BUSI scans per class, test on BUSI's other
duplicate groups. Only honest for a model trained with BUSI held out.

    python scripts/adapt_standin.py MODEL-int8.onnx [--data BUSI_DIR] [--draws 5] [--per-class 10]
        [--seed 0]

Runs ``edge-classify adapt``'s own code (``edge_runtime.adapt.run.adapt``) on a manifest of
``per-class`` scans from distinct duplicate groups (training/data/dedup.py; label-conflicted groups
left out), then scores the parent as it runs (its threshold and, for a lesion model, its lesion
head's "normal") and the adapted model's last layer on every scan of the other groups, from the
FP32 partner's pooled features (equal to running the adapted FP32 file), with confusion matrices
(rows: true class, columns: called class).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from edge_runtime.adapt.evaluate import compare
from edge_runtime.adapt.fit import softmax
from edge_runtime.adapt.graph import find_head, read_head
from edge_runtime.adapt.parent import load_parent, load_partner
from edge_runtime.adapt.run import (
    AdaptOptions,
    AdaptRefused,
    _site_features,
    adapt,
    parent_calls,
)
from edge_runtime.adapt.site import SiteScan
from edge_runtime.model.session import Provider
from edge_runtime.postprocess.decision import decide
from training.data.datasets import discover
from training.data.dedup import group_duplicates

BUSI = Path("../shared/data/busi/Dataset_BUSI_with_GT")  # from a checkout beside shared/


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, default=BUSI)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="of the site draws")
    args = parser.parse_args()
    samples = discover(args.data.resolve())  # the manifest lies elsewhere: absolute paths
    report = group_duplicates(samples)
    main_model = load_parent(args.model)
    classes = main_model.spec.class_names
    scans = [
        SiteScan(s.path, classes.index(s.label), g)
        for s, g in zip(samples, report.groups, strict=True)
        if g not in report.conflicts
    ]
    partner = load_partner(main_model) or main_model
    options = AdaptOptions(site=Path("."), output=Path("x.onnx"), provider=Provider.CPU)
    with tempfile.TemporaryDirectory() as tmp:
        features, kept, _, lesion_found = _site_features(partner, None, scans, Path(tmp), options)
    x = features[partner.path]
    labels = np.array([s.label for s in kept])
    groups = np.array([s.group for s in kept])
    rng = np.random.default_rng(args.seed)
    for draw in range(args.draws):
        picked: list[int] = []
        for c in range(len(classes)):
            candidates = rng.permutation(np.unique(groups[labels == c]))
            taken = {groups[i] for i in picked}
            for group in candidates:
                if group not in taken:
                    picked.append(int(np.where((groups == group) & (labels == c))[0][0]))
                    taken.add(group)
                if sum(labels[picked] == c) == args.per_class:
                    break
        test = np.array([i for i in range(len(kept)) if groups[i] not in set(groups[picked])])
        with tempfile.TemporaryDirectory() as tmp:
            manifest = Path(tmp) / "site.csv"
            manifest.write_text(
                "".join(f"{kept[i].path},{classes[labels[i]]},{groups[i]}\n" for i in picked)
            )
            out = Path(tmp) / "site-int8.onnx"
            try:
                done = adapt(AdaptOptions(site=manifest, output=out, model=args.model))
            except AdaptRefused as exc:
                print(f"draw {draw}: refused: {str(exc).splitlines()[0]}")
                continue
            fp32 = done.written[1] if len(done.written) > 3 else done.written[0]
            import onnx

            proto = onnx.load(str(fp32))
            head = read_head(proto, find_head(proto))
        found = None if lesion_found is None else lesion_found[test]
        before = parent_calls(partner.spec, partner.head, x[test], found)
        adapted = done.record
        after = decide(
            softmax(head.logits(x[test]), adapted["temperature"]["value"]),
            classes,
            adapted["malignant_threshold"]["value"],
        )
        numbers = compare(labels[test], before, after, groups[test], classes)
        cv = done.record["cross_validation"]
        print(
            f"draw {draw}: {len(test)} test scans; site CV accuracy "
            f"{cv['before']['accuracy']['value']:.3f} -> {cv['after']['accuracy']['value']:.3f}"
        )
        for key in ("accuracy", "recall_normal", "recall_malignant"):
            b, a, d = (numbers[p][key] for p in ("before", "after", "difference"))
            print(
                f"  test {key:17} {b['value']:.3f} -> {a['value']:.3f}  difference "
                f"{d['value']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            )
        for name, called in (("parent", before), ("adapted", after)):
            matrix = np.zeros((len(classes), len(classes)), int)
            np.add.at(matrix, (labels[test], called), 1)
            print(f"  {name} confusion {matrix.tolist()}")


if __name__ == "__main__":
    main()
