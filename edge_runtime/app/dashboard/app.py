"""The edge-classify dashboard, a Streamlit script; ``edge-classify dashboard`` serves it.

Everything it shows comes from the runtime's public API (the Classifier, its Results, the CLI's
records); uploads stay in memory and nothing is written to disk. The logic lives in
:mod:`edge_runtime.app.dashboard.scans`; this file only lays it out.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from edge_runtime.app.dashboard import access
from edge_runtime.app.dashboard import scans as sc
from edge_runtime.classifier import Classification, Classifier, ClassifierOptions, Result
from edge_runtime.io.decode import InputError
from edge_runtime.io.sources import expand_sources
from edge_runtime.model.contract import ContractError, NormalRule
from edge_runtime.postprocess.heatmap import overlay

BANNER = (
    "**Not a medical device.** edge-classify is research and engineering software: its results "
    "are not a diagnosis, and every one needs review by a qualified clinician."
)
MAX_ERRORS_SHOWN = 20
UPLOAD_PREFIX, FILE_PREFIX = "upload:", "file:"
FLAG_TITLES = {"abstained": "abstained", "rechecked": "rechecked in FP32"}


def main() -> None:
    """Lay out the page; Streamlit runs this on every interaction."""
    st.set_page_config(page_title="edge-classify dashboard", layout="wide")
    st.warning(BANNER, icon=":material/warning:")
    if not _signed_in():
        st.stop()  # without the token: nothing else, not even the model's name
    try:
        classifier = _open_classifier(_model_argument(sys.argv[1:]))
    except (ContractError, ValueError, OSError) as exc:
        st.error(f"The model could not be opened: {exc}")
        st.stop()
    _model_sidebar(classifier)
    classify_tab, batch_tab, model_tab = st.tabs(["Classify", "Batch", "Model"])
    with classify_tab:
        uploads = _classify_inputs(classifier)
        _scan_view(classifier, uploads)
    with batch_tab:
        _batch_view(classifier)
    with model_tab:
        _model_view(classifier)


def _model_argument(argv: Sequence[str]) -> str | None:
    """``--model`` from the arguments after ``streamlit run app.py --``; None: bundled."""
    return _page_arguments(argv).model


def _page_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """``--model``, ``--data-root`` (repeated) and ``--any-folder`` after ``--``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", default=None)
    parser.add_argument("--data-root", action="append", default=[], type=Path)
    parser.add_argument("--any-folder", action="store_true")
    return parser.parse_known_args(list(argv))[0]


def _signed_in() -> bool:
    """True when the page is open (no token set) or this session gave the right token; else
    shows the token box alone (:mod:`edge_runtime.app.dashboard.access`)."""
    expected = os.environ.get(access.TOKEN_ENV) or None
    if expected is None or st.session_state.get("signed_in"):
        return True
    with st.form("sign_in"):
        given = st.text_input(
            "Access token (printed where the dashboard was started)", type="password", key="token"
        )
        submitted = st.form_submit_button("Open the dashboard")
    if submitted and access.token_matches(expected, given):
        st.session_state["signed_in"] = True
        st.rerun()
    if submitted:
        st.error("Wrong token.")
    return False


@st.cache_resource(show_spinner="Opening the model...")
def _open_classifier(model: str | None) -> Classifier:
    return Classifier.from_options(ClassifierOptions(model_path=model))


def _results() -> dict[str, list[Result]]:
    """This session's results: scan key -> one result per frame, in the order classified."""
    return st.session_state.setdefault("results", {})


def _classify_inputs(classifier: Classifier) -> dict[str, Any]:
    """The upload box and the host-folder field; classifies what is new, with progress.

    Returns:
        The current uploads by scan key.
    """
    uploaded = st.file_uploader(
        "Scans: PNG, JPEG, BMP, TIFF or DICOM (multi-frame too). They stay in this server's "
        "memory; nothing is saved.",
        accept_multiple_files=True,
        key="uploads",
    )  # no type filter: a file of the wrong kind gets its own error, like the CLI's
    uploads = {f"{UPLOAD_PREFIX}{f.file_id}": f for f in uploaded or []}
    pending: dict[str, sc.Scan] = st.session_state.setdefault("pending", {})
    with st.expander("Or classify a folder on this host"), st.form("folder_form", border=False):
        folder = st.text_input(
            "Folder (searched recursively)", placeholder="/data/today", key="folder"
        )
        if st.form_submit_button("Classify folder") and folder.strip():
            pending.update(_folder_scans(folder.strip()))
    results = _results()
    for key in [k for k in results if k.startswith(UPLOAD_PREFIX) and k not in uploads]:
        del results[key]  # removed from the upload box
    new_uploads = [key for key in uploads if key not in results]
    todo = len(new_uploads) + sum(key not in results for key in pending)
    if todo:
        scans = itertools.chain(
            (sc.Scan(key, uploads[key].name, data=uploads[key].getvalue()) for key in new_uploads),
            [scan for key, scan in pending.items() if key not in results],
        )  # lazy: only the chunk being classified holds a copy of its uploads' bytes
        _classify_with_progress(classifier, scans, todo)
    pending.clear()
    _show_failures(results)
    return uploads


def _folder_scans(folder: str) -> dict[str, sc.Scan]:
    arguments = _page_arguments(sys.argv[1:])
    roots = tuple(root.resolve() for root in arguments.data_root)
    allowed, reason = access.folder_allowed(folder, roots, any_folder=arguments.any_folder)
    if allowed is None:
        st.error(reason)
        return {}
    files, problems = expand_sources([str(allowed)])
    if roots:  # links under a root that lead out of it are not followed
        files = [p for p in files if access.within_roots(p, roots)]
    for item, reason in problems:
        st.error(f"{item}: {reason}")
    return {
        f"{FILE_PREFIX}{p.resolve()}": sc.Scan(f"{FILE_PREFIX}{p.resolve()}", str(p), path=p)
        for p in files
    }


def _classify_with_progress(classifier: Classifier, scans: Iterable[sc.Scan], total: int) -> None:
    """Classify, storing each chunk's results as it completes (a rerun keeps what is done)."""
    results = _results()
    bar = st.progress(0.0, text=f"Classifying {total} scans...")
    start = time.perf_counter()
    for done, (scan, scan_results) in enumerate(sc.classify_scans(classifier, scans), 1):
        results[scan.key] = scan_results
        bar.progress(done / total, text=f"Classified {done} of {total} scans")
    bar.empty()
    st.toast(f"Classified {total} scans in {time.perf_counter() - start:.1f} s")


def _show_failures(results: Mapping[str, list[Result]]) -> None:
    failed = [r for rs in results.values() for r in rs if not r.ok]
    for result in failed[:MAX_ERRORS_SHOWN]:
        st.error(f"{result.source}: {result.error}")
    if len(failed) > MAX_ERRORS_SHOWN:
        st.error(
            f"{len(failed) - MAX_ERRORS_SHOWN} more scans could not be classified: the Batch "
            f"tab lists them all (label '{sc.FAILED}')."
        )


def _scan_view(classifier: Classifier, uploads: Mapping[str, Any]) -> None:
    """One scan: label, probabilities, flags, the scan beside its heatmap; frames of a cine."""
    results = _results()
    if not results:
        st.info("Upload scans above, or classify a folder on this host, to see them here.")
        return
    key = st.selectbox(
        "Scan on view",
        list(results),
        format_func=lambda k: _scan_title(results[k]),
        key="scan_on_view",
    )
    scan_results = results[key]
    index = 0
    if len(scan_results) > 1:
        index = st.slider("Frame of the cine", 0, len(scan_results) - 1, 0, key=f"frame-{key}")
    result = scan_results[index]
    if not result.ok:
        st.error(f"{result.source}: {result.error}")
        return
    facts, scan_column, heat_column = st.columns([1, 1, 1])
    with facts:
        _result_facts(result, classifier.spec.class_names)
    frame = _frame_on_view(key, uploads, index)
    if frame is None:
        return
    explained = sc.explain(classifier, frame, result.source)
    scan_column.image(frame, caption=_frame_caption(result), width="stretch")
    heat_column.image(
        overlay(explained.image, explained.heatmap),
        channels="BGR",
        caption=f"Heatmap: where the model saw evidence for {explained.label}",
        width="stretch",
    )
    _lesion_outline(classifier, explained)


def _scan_title(scan_results: Sequence[Result]) -> str:
    first = scan_results[0]
    if not first.ok:
        return f"{first.source}: failed"
    if len(scan_results) > 1:
        return f"{first.source}: {len(scan_results)} frames"
    return f"{first.source}: {first.label} ({first.confidence:.2f})"


def _frame_caption(result: Result) -> str:
    frame = "" if result.frame is None else f", frame {result.frame}"
    return f"{result.source}{frame}"


def _result_facts(result: Classification, class_names: Sequence[str]) -> None:
    st.metric("Label", result.label)
    st.metric("Confidence", f"{result.confidence:.3f}")
    st.markdown(" ".join(_flag_badge(result, name) for name in sc.flag_names()))
    if result.abstain_reason:
        st.warning(f"Abstained: {result.abstain_reason}. Do not act on this label.")
    st.bar_chart(
        pd.DataFrame(
            {"probability": [result.probabilities[name] for name in class_names]},
            index=pd.Index(class_names, name="class"),
        ),
        horizontal=True,
        sort=False,
        height=160,
        x_label="",
        y_label="calibrated probability",
    )
    timing = result.timing
    st.caption(
        f"{timing.total_ms:.1f} ms: decode {timing.decode_ms:.1f}, preprocess "
        f"{timing.preprocess_ms:.1f}, inference {timing.inference_ms:.1f}"
    )


def _flag_badge(result: Result, name: str) -> str:
    title = FLAG_TITLES.get(name, name)
    if getattr(result, name, False):
        return f":orange-badge[{title}]"
    return f":gray-badge[not {title}]"


def _frame_on_view(key: str, uploads: Mapping[str, Any], index: int) -> Any:
    """The scan's frame ``index``, decoded again (kept for the scan on view only)."""
    cached = st.session_state.get("frames_on_view")
    if cached is None or cached[0] != key:
        if key.startswith(UPLOAD_PREFIX):
            upload = uploads[key]
            scan = sc.Scan(key, upload.name, data=upload.getvalue())
        else:
            path = Path(key.removeprefix(FILE_PREFIX))
            scan = sc.Scan(key, str(path), path=path)
        try:
            cached = (key, scan.frames())
        except InputError as exc:
            st.error(str(exc))
            return None
        st.session_state["frames_on_view"] = cached
    return cached[1][index]


def _lesion_outline(classifier: Classifier, explained: Classification) -> None:
    """The lesion the model found in the frame on view: the scan outlined, its box and size.

    ``explained`` is the frame classified with heatmaps, which carries the lesion mask; the
    outline is the runtime's own (:func:`~edge_runtime.postprocess.heatmap.overlay` with no heatmap
    colour).
    """
    spec = classifier.spec
    if not spec.has_lesion:
        st.caption("Lesion outline and size: this model has no lesion output.")
        return
    facts, outline_column, _ = st.columns([1, 1, 1])
    facts.subheader("Lesion")
    lesion = explained.lesion
    if lesion is None or explained.lesion_mask is None:
        rule = f"threshold {spec.lesion_threshold:.2f}"
        if spec.lesion_min_area:
            rule += f", regions of at least {spec.lesion_min_area:.2%} of its input"
        if spec.normal_rule is NormalRule.LESION_HEAD_OR_CLASSIFIER:
            rule += ", none on a scan its classifier calls normal"
            if spec.normal_gate:
                rule += f" or gives P(normal) >= {spec.normal_gate:.2f}"
        facts.info(f"No lesion found by the model's lesion rule ({rule}).")
        return
    facts.markdown(sc.lesion_size(lesion))
    outline_column.image(
        overlay(
            explained.image,
            explained.heatmap,
            alpha=0.0,
            lesion_mask=explained.lesion_mask,
            origin=explained.origin,
        ),
        channels="BGR",
        caption=f"Lesion outline: {explained.source}",
        width="stretch",
    )


def _batch_view(classifier: Classifier) -> None:
    """Every result: counts per label, a sortable, filterable table and the downloads."""
    class_names = classifier.spec.class_names
    all_results = [r for rs in _results().values() for r in rs]
    if not all_results:
        st.info("No scans classified yet.")
        return
    counts = sc.label_counts(all_results, class_names)
    flags = {
        name: sum(bool(getattr(r, name, False)) for r in all_results) for name in sc.flag_names()
    }
    for column, (title, count) in zip(
        st.columns(len(counts) + len(flags)), [*counts.items(), *flags.items()], strict=True
    ):
        column.metric(FLAG_TITLES.get(title, title), count)
    labels_col, flags_col, name_col = st.columns(3)
    labels = labels_col.multiselect(
        "Labels", list(counts), placeholder="all labels", key="label_filter"
    )
    wanted_flags = flags_col.multiselect(
        "Only with flags", list(sc.flag_names()), placeholder="any flags", key="flag_filter"
    )
    name_part = name_col.text_input("File name contains", placeholder="any file", key="name_filter")
    shown = [r for r in all_results if _matches(r, labels, wanted_flags, name_part)]
    st.dataframe(
        pd.DataFrame(_with_abstain_reasons(shown, class_names, classifier.spec.has_lesion)),
        hide_index=True,
        width="stretch",
        column_config={
            "confidence": st.column_config.NumberColumn(format="%.3f"),
            **{name: st.column_config.NumberColumn(format="%.3f") for name in class_names},
            "lesion_area_mm2": st.column_config.NumberColumn(format="%.1f"),
            "lesion_diameter_mm": st.column_config.NumberColumn(format="%.1f"),
        },
        key="batch_table",
    )
    st.caption(f"{len(shown)} of {len(all_results)} results shown; click a header to sort.")
    csv_col, jsonl_col, _ = st.columns([1, 1, 3])
    csv_col.download_button(
        f"CSV ({len(shown)} rows)",
        sc.to_csv(shown, class_names),
        file_name="edge-classify.csv",
        mime="text/csv",
        on_click="ignore",
    )
    jsonl_col.download_button(
        f"JSON lines ({len(shown)} rows)",
        sc.to_jsonl(shown),
        file_name="edge-classify.jsonl",
        mime="application/x-ndjson",
        on_click="ignore",
    )


def _with_abstain_reasons(
    results: Sequence[Result], class_names: Sequence[str], lesion: bool
) -> list[dict[str, Any]]:
    """The batch table's rows, with each result's abstain reason after its flags."""
    rows = sc.table_rows(results, class_names, lesion=lesion)
    for row, result in zip(rows, results, strict=True):
        reason = getattr(result, "abstain_reason", None) or ""
        at = list(row).index("abstained") + 1
        items = list(row.items())
        row.clear()
        row.update([*items[:at], ("abstain_reason", reason), *items[at:]])
    return rows


def _matches(result: Result, labels: Sequence[str], flags: Sequence[str], name_part: str) -> bool:
    label = result.label if isinstance(result, Classification) else sc.FAILED
    return (
        (not labels or label in labels)
        and all(getattr(result, flag, False) for flag in flags)
        and name_part.lower() in result.source.lower()
    )


def _model_sidebar(classifier: Classifier) -> None:
    facts = sc.model_facts(classifier)
    with st.sidebar:
        st.header("Model")
        for name in ("model", "version", "precision", "provider", "FP32 recheck"):
            st.markdown(f"**{name}**: `{facts[name]}`")
        st.caption("Not a medical device. The Model tab shows the full model card.")


def _model_view(classifier: Classifier) -> None:
    """Which model runs, where, and its card (data, metrics with intervals, limits)."""
    facts = sc.model_facts(classifier)
    st.table(pd.DataFrame({"value": list(facts.values())}, index=pd.Index(list(facts), name="")))
    card = sc.model_card(classifier.model_path)
    if card is None:
        st.info(f"No model card beside {classifier.model_path}.")
    elif card[0] == "markdown":
        st.markdown(card[1])
    else:
        st.json(card[1], expanded=1)


main()
