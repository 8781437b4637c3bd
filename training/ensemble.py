"""Combine trained runs into one ensemble run, and report on it as on a trained one.

usage: python -m training.ensemble DATA... --member RUN [--member RUN ...] --output RUN
           --image-size S [--mirror]

Each member is an ``edge-train`` run folder trained on the same data with the same seed, so that
its final model and its scanner-held-out folds (``scanners/*``) used the same splits (checked:
every ``split.csv`` must be identical). For the final model and for every fold that all members
have, the members' models become one graph (:func:`training.model.ensemble.combine`) saved in the
same place under ``--output``, with the first member's ``split.csv`` (and no ``history.csv``: the
graph was not trained, so its report has no training curves and no warnings about them); then the
run is reported on exactly as ``edge-train --report-only`` reports (test metrics, calibration,
lesion rule chosen on validation, ``protocol.json``). One member with ``--mirror`` is flip
test-time augmentation of that model alone. ``edge-export`` exports the result like any run.
``edge-train`` with several ``--backbone``s trains the members and builds the graph in one command
(:func:`train_ensemble`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING

from edge_runtime.app.shell import ExitStatus
from training.runfolder import (
    HISTORY_FILE,
    LOG_FILE,
    MODEL_FILE,
    PROTOCOL_FILE,
    RUN_FILE,
    SPLIT_FILE,
    RunInfo,
    training_options,
)

if TYPE_CHECKING:
    from training.model.backbones import Backbone
    from training.run import TrainConfig

log = logging.getLogger(__name__)
FOLDS_DIR = "scanners"
MEMBERS_DIR = "members"  # edge-train with several backbones: one run folder per member
MEMBER_RECORD = "member.json"  # a member's options, written when its training has finished


def model_folders(run: Path) -> list[Path]:
    """The folders of ``run`` that hold a model, relative to it: ``.`` and ``scanners/*``."""
    folders = [Path(".")] if (run / MODEL_FILE).is_file() else []
    folders += sorted(
        p.relative_to(run) for p in (run / FOLDS_DIR).glob("*") if (p / MODEL_FILE).is_file()
    )
    return folders


def ensemble_label(
    infos: Sequence[RunInfo], mirror: bool, lesion_from: Sequence[int] | None = None
) -> str:
    """What the card and metadata call the ensemble's backbone, e.g.
    ``efficientnet-lite0@160 + efficientnet-lite2@224, mirrored, lesion from member 1``. The
    lesion source is named only where the graph has a lesion output (every member has one, as
    :func:`training.model.ensemble.combine` builds it)."""
    label = " + ".join(f"{i.backbone}@{i.input_size}" for i in infos)
    if mirror:
        label += ", mirrored"
    lesion = all(i.lesion_stride for i in infos)
    if lesion and lesion_from is not None and len(set(lesion_from)) < len(infos):
        label += ", lesion from member " + " and ".join(str(k + 1) for k in sorted(lesion_from))
    return label


def member_backbones(label: str) -> list[str]:
    """The members' backbones named by :func:`ensemble_label`'s ``label``; a single model's
    backbone label gives itself."""
    return [backbone for backbone, _ in parse_label(label)[0]]


def parse_label(label: str) -> tuple[list[tuple[str, int | None]], bool, list[int] | None]:
    """:func:`ensemble_label` read back: the members' ``(backbone, input side)`` (side None for
    a single model's bare backbone label), whether mirrored, and ``lesion_from`` (0-based;
    None: every member)."""
    parts = label.split(", ")
    members = []
    for member in parts[0].split(" + "):
        backbone, _, side = member.partition("@")
        members.append((backbone, int(side) if side else None))
    lesion_from = None
    for part in parts[1:]:
        if part.startswith("lesion from member "):
            words = part[len("lesion from member ") :].split(" and ")
            lesion_from = [int(k) - 1 for k in words]
    return members, "mirrored" in parts[1:], lesion_from


def recorded_options(run: Path) -> dict[str, object]:
    """What ``run`` was trained with, under ``edge-train``'s option names: ``backbone`` (a
    tuple, one per member), ``image_size``, ``seed`` and, with several members, ``lesion_from``
    (1-based). Read from the ``run.json`` of its first model folder, or, for an ensemble whose
    graph is not written yet, from its members' folders; empty when it holds no trained model.

    Raises:
        ValueError: a damaged ``run.json``.
    """
    run = Path(run)
    members = _member_folders(run)
    for folder in [run, *members]:
        if (info := _first_info(folder)) is not None:
            break
    else:
        return {}
    parsed, _, lesion = parse_label(info.backbone)
    backbones = tuple(b for b, _ in parsed)
    sides = tuple(side or info.input_size for _, side in parsed)
    if folder != run:  # the graph is not written: its members say what it holds
        backbones = tuple(p.name.partition("-")[2] for p in members)
        sides = tuple(getattr(_first_info(p), "input_size", info.input_size) for p in members)
    options: dict[str, object] = {
        "backbone": backbones,
        "image_size": sides if len(set(sides)) > 1 else info.input_size,
        "seed": info.seed,
    }
    if len(backbones) > 1 and folder == run:
        chosen = range(len(backbones)) if lesion is None else lesion
        options["lesion_from"] = tuple(k + 1 for k in chosen)
    return options


def _first_info(run: Path) -> RunInfo | None:
    """The ``run.json`` of ``run``'s first model folder that has one; None when none has."""
    described = [f for f in model_folders(run) if (run / f / RUN_FILE).is_file()]
    return RunInfo.read(run / described[0]) if described else None


def build_ensemble_run(
    config: TrainConfig,
    members: Sequence[Path],
    mirror: bool,
    lesion_from: Sequence[int] | None = None,
) -> list[RunInfo]:
    """Write the ensemble run folder ``config.output`` and report on it, with ``config``'s data,
    input side and options (its seed and INT8-grid flag are the members').

    Returns:
        The ``run.json`` of each reported folder (final model first, when there is one).

    Raises:
        ValueError: no member, members trained with different seeds, no folder common to all
            members, or a common folder whose splits differ between members.
        FileNotFoundError: a member is not a run folder.
    """
    from training.model.classifier import load_classifier
    from training.model.ensemble import combine
    from training.run import report_saved

    if not members:
        raise ValueError("Name at least one --member run folder.")
    for member in members:
        if not Path(member).is_dir():
            raise FileNotFoundError(f"{member}: run folder not found")
    common = set(model_folders(members[0])).intersection(*map(set, map(model_folders, members)))
    if not common:
        raise ValueError(f"The members {[str(m) for m in members]} have no model folder in common.")
    # a run trained with --cv-only has fold models only: describe each member by its first
    infos = [RunInfo.read(m / min(common)) for m in members]
    if len({i.seed for i in infos}) != 1:
        raise ValueError(
            f"The members were trained with different seeds ({[i.seed for i in infos]}), so "
            "their splits differ; retrain them with one seed."
        )
    output = config.output
    for folder in sorted(common):
        splits = [(m / folder / SPLIT_FILE).read_bytes() for m in members]
        if any(s != splits[0] for s in splits):
            raise ValueError(
                f"{folder}: the members' {SPLIT_FILE} differ, so their test scans are not the "
                "same; ensemble only runs trained on the same data with the same seed."
            )
        target = output / folder
        target.mkdir(parents=True, exist_ok=True)
        models = [load_classifier(m / folder / MODEL_FILE) for m in members]
        combine(models, config.input_size, mirror=mirror, lesion_from=lesion_from).save(
            target / MODEL_FILE
        )
        shutil.copy2(members[0] / folder / SPLIT_FILE, target / SPLIT_FILE)
        (target / HISTORY_FILE).unlink(missing_ok=True)  # the graph itself was not trained
        log.info("%s: combined %d members", target, len(models))
    label = ensemble_label(infos, mirror, lesion_from)
    config = dataclasses.replace(
        config, seed=infos[0].seed, int8_grid=all(i.int8_grid for i in infos)
    )
    report_saved(config)
    # what the members were trained with, where they agree (the report knows none of it)
    augment = infos[0].augment if all(i.augment == infos[0].augment for i in infos) else {}
    written = []
    for folder in sorted(common):
        info = dataclasses.replace(RunInfo.read(output / folder), backbone=label, augment=augment)
        info.write(output / folder)
        written.append(info)
    return written


def train_ensemble(
    config: TrainConfig,
    backbones: Sequence[Backbone],
    lesion_from: Sequence[int],
    input_sizes: Sequence[int] | None = None,
    report_only: bool = False,
    jobs: int = 1,
    quiet: bool = False,
) -> list[RunInfo]:
    """``edge-train`` with several backbones: train one member run per backbone with
    ``config``'s options, in ``config.output/members/<k>-<backbone>/``, then combine them in
    ``config.output`` (:func:`build_ensemble_run`, no flips) at ``config.input_size``.

    A member whose training finished with the same options (its ``member.json`` records them,
    data paths resolved) and whose models are all there is kept, and a member in progress keeps
    its finished folds (:func:`training.run.train`), so a stopped run loses at most the fold in
    progress of each; the log says why any other member is trained. ``report_only``
    trains nothing: it reports again on the members and on the graph.

    Args:
        lesion_from: 0-based members whose lesion map the graph keeps.
        input_sizes: each member's input side in pixels, one per backbone (default: every
            member at ``config.input_size``); the graph scales the scan to each.
        jobs: members trained at once (at most as many as are to be trained), each in a
            process of its own that logs to its member folder's ``train.log`` and to stderr
            (lines prefixed with the member's folder name; only warnings and errors when
            ``quiet``); 1: one after the other. A member's models do not depend on it.

    Returns:
        As :func:`build_ensemble_run`.

    Raises:
        FileNotFoundError: with ``report_only``, a member the run does not hold.
        Exception: the first member's training that failed, once every other member's
            training has ended.
    """
    from training.data.datasets import discover_all
    from training.run import report_saved, segmentation_wanted

    sizes = [config.input_size] * len(backbones) if input_sizes is None else input_sizes
    members = [
        dataclasses.replace(
            config,
            output=config.output / MEMBERS_DIR / f"{k + 1}-{b.value}",
            backbone=b,
            input_size=side,
        )
        for k, (b, side) in enumerate(zip(backbones, sizes, strict=True))
    ]
    if report_only:
        _check_reportable(config.output, [m.output for m in members])
    samples = discover_all(config.data).samples  # a data error named once, before any member
    if not report_only and segmentation_wanted(config.segmentation, samples):
        _check_lesion_sides(members)  # before any member trains, not after the first
    folders, pending = [], []
    for k, member in enumerate(members):
        folder = member.output
        log.info("member %d of %d (%s): %s", k + 1, len(members), member.backbone.value, folder)
        if report_only:
            report_saved(member)
        elif (reason := _why_train(member)) is None:
            log.info("%s: trained with these options already; kept", folder)
        else:
            log.info("%s: training it (%s)", folder, reason)
            pending.append(member)
        folders.append(folder)
    _train_members(pending, jobs, quiet)
    log.info("combining %d members into one graph: %s", len(folders), config.output)
    return build_ensemble_run(config, folders, mirror=False, lesion_from=lesion_from)


def _check_lesion_sides(members: Sequence[TrainConfig]) -> None:
    """Refuse a member whose input side cannot carry the lesion head, naming it.

    Raises:
        ValueError: as :func:`~training.model.backbones.check_lesion_input_size`, prefixed with
            the member.
    """
    from training.model.backbones import check_lesion_input_size

    for k, member in enumerate(members):
        try:
            check_lesion_input_size(member.backbone, member.input_size)
        except ValueError as exc:
            raise ValueError(
                f"member {k + 1} ({member.backbone.value} at {member.input_size} px): {exc} "
                "(--image-size gives one side per member, in --backbone's order)"
            ) from None


def has_trained_model(run: Path) -> bool:
    """Whether ``run`` holds a saved model: its own, a scanner fold's or an ensemble member's."""
    run = Path(run)
    return bool(model_folders(run)) or any(map(model_folders, _member_folders(run)))


def _member_folders(run: Path) -> list[Path]:
    """``run``'s member folders (``members/<k>-<backbone>``, as :func:`train_ensemble` names
    them), in member order."""
    found = [p for p in (run / MEMBERS_DIR).glob("*") if p.name.partition("-")[0].isdigit()]
    return sorted(found, key=lambda p: int(p.name.partition("-")[0]))


def _check_reportable(run: Path, members: Sequence[Path]) -> None:
    """Refuse, before any report is rewritten, to report on an ensemble run whose members are
    not all trained."""
    if not (run / MEMBERS_DIR).is_dir():
        raise FileNotFoundError(
            f"{run}: no {MEMBERS_DIR}/ folder, so edge-train did not train this ensemble; one "
            "built by python -m training.ensemble is reported again by that command"
        )
    unfinished = [m.name for m in members if not model_folders(m)]
    if unfinished:
        raise FileNotFoundError(
            f"{run}: member {' and '.join(unfinished)} has no trained model (its training did "
            "not finish), so there is nothing whole to report on; run the same edge-train "
            "command without --report-only to finish it"
        )


def _train_members(members: Sequence[TrainConfig], jobs: int, quiet: bool) -> None:
    """Train ``members`` (see :func:`train_ensemble`'s ``jobs``), every one to its end before
    the first failure is raised, so that one member's failure loses no other's training."""
    if not members:
        return
    errors = []
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no TensorFlow state
    workers = min(jobs, len(members))
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_exit_on_interrupt) as pool:
        running = {
            pool.submit(_train_member_apart, m.output, pickle.dumps(m), quiet): m.output
            for m in members
        }
        log.info(
            "training %d member(s), %d at a time, each in a process of its own (logs: %s)",
            len(members),
            workers,
            ", ".join(str(folder / LOG_FILE) for folder in running.values()),
        )
        for done in as_completed(running):
            try:
                done.result()
                log.info("%s: trained", running[done])
            except SystemExit as exc:  # Ctrl-C ended the member's process (_exit_on_interrupt)
                raise KeyboardInterrupt from exc
            except Exception as exc:  # the others go on; the first failure is raised at the end
                log.error("%s: training failed: %s", running[done], exc)
                errors.append(exc)
    if errors:
        raise errors[0]


def _exit_on_interrupt() -> None:
    """In a member's process: Ctrl-C (which reaches the whole process group) ends it quietly;
    ``edge-train`` itself says it was interrupted."""
    signal.signal(signal.SIGINT, lambda *_: sys.exit(ExitStatus.INTERRUPTED))


def _train_member_apart(output: Path, pickled: bytes, quiet: bool) -> None:
    """Train the member whose folder is ``output`` in a process of its own, logging as
    ``edge-train`` does, to ``output/train.log`` (appended to) and to stderr with the folder's
    name before each line; record its options once its training has finished. ``pickled`` is
    the member's :class:`~training.run.TrainConfig`: unpickled only once TensorFlow's start-up
    noise is caught (into that log), since its module imports TensorFlow."""
    from training.console import command_logging, import_tensorflow

    # two processes on one GPU: each takes memory as it needs it, not all of it at start
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    with command_logging(sys.stderr, output / LOG_FILE, quiet=quiet, prefix=f"{output.name}: "):
        import_tensorflow()
        from training.run import train

        member = pickle.loads(pickled)
        (member.output / MEMBER_RECORD).unlink(missing_ok=True)
        train(member)
        record = json.dumps(training_options(member), indent=1)
        (member.output / MEMBER_RECORD).write_text(record + "\n")


def _why_train(member: TrainConfig) -> str | None:
    """Why ``member`` must be trained, or None when its folder holds that training, finished."""
    record = member.output / MEMBER_RECORD
    if not record.is_file():
        return "no finished training there"
    try:
        recorded = json.loads(record.read_text())
    except ValueError:
        return f"{MEMBER_RECORD} is unreadable"
    wanted = training_options(member)
    changed = sorted(k for k in wanted.keys() | recorded.keys() if wanted.get(k) != recorded.get(k))
    if changed:
        return "trained with other options: " + ", ".join(changed)
    needed = []
    if member.final_model:
        needed += [member.output / MODEL_FILE, member.output / RUN_FILE]
    if member.leave_scanner_out:
        needed.append(member.output / PROTOCOL_FILE)
    missing = [p.name for p in needed if not p.is_file()]
    if not missing:
        return None
    return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.ensemble",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("data", nargs="+", type=Path, metavar="DATA", help="dataset folders")
    parser.add_argument(
        "--member", action="append", type=Path, required=True, help="a member run folder"
    )
    parser.add_argument("--output", type=Path, required=True, help="ensemble run folder to write")
    parser.add_argument(
        "--image-size", type=int, required=True, help="the ensemble's input side in pixels"
    )
    parser.add_argument(
        "--mirror", action="store_true", help="also average each member on the mirrored scan"
    )
    parser.add_argument(
        "--lesion-from",
        type=int,
        nargs="+",
        metavar="K",
        help="only these members (1 = the first --member) make the lesion map, which draws the "
        "outline and decides 'normal' (default: all)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from training.console import import_tensorflow

    import_tensorflow()
    from training.run import TrainConfig

    try:
        lesion_from = None if args.lesion_from is None else [k - 1 for k in args.lesion_from]
        config = TrainConfig(data=tuple(args.data), output=args.output, input_size=args.image_size)
        build_ensemble_run(config, args.member, args.mirror, lesion_from)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ensemble: error: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    return ExitStatus.SUCCESS


if __name__ == "__main__":
    sys.exit(main())
