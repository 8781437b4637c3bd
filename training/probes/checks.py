"""The frame the held-out checks share (``training.probes.attention``, ``training.probes.marks``,
``training.probes.identity``, ``training.probes.lesionfree``): read run folders, measure each run's
model on its own held-out scans, pool, summarize, write JSON, print.

Several run folders are pooled: the folds of a cross-validation hold every scan out once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from edge_runtime.model.contract import ResizePolicy
from training.data.datasets import Sample
from training.data.splits import read_manifest
from training.runfolder import MODEL_FILE, SPLIT_FILE, RunInfo

# measure(model, samples, class_names, input_size, policy) -> one dataclass row per scan
Measure = Callable[[object, Sequence[Sample], Sequence[str], int, ResizePolicy], list]


def split_samples(run_dir: Path, split: str) -> list[Sample]:
    """The scans of one split of a run, with their masks, from its ``split.csv``.

    Raises:
        ValueError: the split has no rows (DatasetError, for an unreadable manifest, is one).
    """
    manifest = read_manifest(run_dir / SPLIT_FILE)
    samples = [
        s for s, part in zip(manifest.samples, manifest.splits, strict=True) if part == split
    ]
    if not samples:
        raise ValueError(f"{run_dir / SPLIT_FILE}: no rows in split {split!r}")
    return samples


@dataclass(frozen=True)
class HeldOutCheck:
    """One held-out check's command line: ``main = HeldOutCheck(...).main`` in its module.

    Attributes are :func:`run_check`'s arguments (``module`` is the program name, ``doc`` the
    module docstring).
    """

    module: str
    doc: str
    file_name: str
    measure: Measure
    summarize: Callable[[list], dict[str, dict]]
    describe: Callable[[dict], str]

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Run the check on the run folders in ``argv``; returns the exit status."""
        return run_check(argv, **{f.name: getattr(self, f.name) for f in fields(self)})


def run_check(
    argv: Sequence[str] | None,
    *,
    module: str,
    doc: str,
    file_name: str,
    measure: Measure,
    summarize: Callable[[list], dict[str, dict]],
    describe: Callable[[dict], str],
) -> int:
    """The command line of a held-out check; returns its exit status (2: an unusable run
    folder, or held-out scans the check cannot use).

    Args:
        argv: the arguments (None: ``sys.argv``).
        module: the check's module (``training.probes.marks``), its program name.
        doc: the module docstring: a description line, then text ending in ``examples:``.
        file_name: the JSON report's default name, written into the run folder (or, for
            several, into their common parent).
        measure: measures one run's model on that run's held-out scans.
        summarize: the pooled rows -> ``{group: {statistic: value}}``.
        describe: one group's statistics as a line of text.
    """
    name = module.rsplit(".", 1)[-1]
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=doc.split("\n", 1)[0],
        epilog="examples:" + doc.split("examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="edge-train run folders"
    )
    parser.add_argument("--split", default="test", help="which split to measure (default test)")
    parser.add_argument(
        "--json",
        type=Path,
        help=f"where to write (default RUN_DIR/{file_name}; for several, in their parent)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        runs = [(d, RunInfo.read(d), split_samples(d, args.split)) for d in args.run_dirs]
    except (FileNotFoundError, ValueError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    from training.model.classifier import load_classifier

    rows = []
    for run_dir, info, samples in runs:
        model = load_classifier(run_dir / MODEL_FILE)
        policy = ResizePolicy(info.resize_policy)
        try:
            rows += measure(model, samples, info.class_names, info.input_size, policy)
        except ValueError as exc:  # the run's scans do not allow the check
            print(f"{name}: error: {run_dir}: {exc}", file=sys.stderr)
            return 2
    summary = summarize(rows)
    home = args.run_dirs[0] if len(args.run_dirs) == 1 else Path(os.path.commonpath(args.run_dirs))
    target = args.json or home / file_name
    report = {
        "split": args.split,
        "runs": [str(d) for d in args.run_dirs],
        "summary": summary,
        "scans": [asdict(r) for r in rows],
    }
    target.write_text(json.dumps(report, indent=2) + "\n")
    for group, statistics in summary.items():
        print(f"{group}: {describe(statistics)}")
    print(f"wrote {target}")
    return 0
