"""The model card: every metric with its interval, the confusion matrix, sources and CV."""

from __future__ import annotations

import json

import numpy as np

from export.card import build_card, render_markdown, write_card
from export.parity import reduced_precision_gate
from export.quantize import Calibration, QuantConfig
from training.evaluation.metrics import evaluate, summarize_folds
from training.run import cross_validation_report
from training.runfolder import RunInfo

CLASSES = ("normal", "benign", "malignant")


def _model_file(path, dtype=np.float16):
    """A tiny real ONNX file (one Identity over a weight of ``dtype``) at ``path``."""
    import onnx
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), dtype), "w")
    out = helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])], "g", [], [out], [weight]
    )
    onnx.save(helper.make_model(graph), path)
    return path


def _metrics(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, 60)
    probs = rng.dirichlet(np.ones(3), 60)
    probs[np.arange(60), labels] += 1.0  # mostly right
    return evaluate(labels, probs / probs.sum(1, keepdims=True), CLASSES, n_boot=50)


def test_card_renders_intervals_confusion_sources_and_cross_validation(tmp_path):
    metrics = _metrics(0)
    metrics["jitter_stability"] = 0.97
    info = RunInfo(
        CLASSES,
        224,
        "letterbox",
        "efficientnet-lite0",
        0,
        "f" * 64,
        int8_grid=True,
        test_metrics=metrics,
    )
    model = _model_file(tmp_path / "m-fp32.onnx")
    probs = np.eye(3)[[0, 1, 2, 1]]
    gate = reduced_precision_gate("onnx-int8 vs onnx-fp32", probs, probs, np.array([0, 1, 2, 1]))
    device = {"auc": 0.93, "ci95": [0.88, 0.97], "n": 120, "n_positive": 40}
    by_source = {
        "by_source": {"busi": {"n": 30, "accuracy": 0.8, "macro_f1": 0.7}},
        "benign_vs_malignant_auc_by_device": {"busbra:GE Logiq 5": device},
    }
    folds = [_metrics(s) for s in (1, 2, 3)]
    fold_sources = [
        {
            "by_source": {"busi": folds[k]},
            "benign_vs_malignant_auc_by_device": {"busbra:GE Logiq 5": {**device, "auc": auc}},
        }
        for k, auc in enumerate((0.90, 0.92, 0.94))
    ]
    reports = {
        "by_source": by_source,
        "cross_validation": cross_validation_report(folds, fold_sources, ["busi"]),
    }
    quantization = QuantConfig(calibration=Calibration.PERCENTILE).describe()
    card = build_card("m", info, [model], [gate], quantization, reports)
    json_path, md_path = write_card(card, tmp_path)
    assert json.loads(json_path.read_text())["cross_validation"]["folds"] == 3
    text = md_path.read_text()
    assert text == render_markdown(card)
    low, high = metrics["ci95"]["accuracy"]
    assert f"- accuracy: {metrics['accuracy']:.3f} (95% bootstrap CI {low:.3f}-{high:.3f})" in text
    assert "top-1 unchanged under +-2 gray levels of pixel noise: 0.970" in text
    row = metrics["confusion_matrix"][2]
    assert f"| malignant | {row[0]} | {row[1]} | {row[2]} |" in text
    assert "| busi | 30 | 0.800 | 0.700 |" in text
    assert "- busbra:GE Logiq 5: 0.930 (0.880-0.970; 120 scans, 40 malignant)" in text
    assert "## Grouped cross-validation (3 folds, 180 images)" in text
    busi = summarize_folds(folds)["metrics"]["accuracy"]
    assert f"| busi | 180 | {busi['mean']:.3f} (" in text
    low, high = cross_validation_report(folds, fold_sources, ["busi"])[
        "benign_vs_malignant_auc_by_device"
    ]["busbra:GE Logiq 5"]["ci95"]
    assert f"- busbra:GE Logiq 5: 0.920 ({low:.3f}-{high:.3f}); 360 scans" in text
    assert "Not a medical device" in text
    assert "top-1 agreement 1.0000, accuracy 1.0000 -> 1.0000: PASS" in text
    assert "weights int8 per channel, percentile 99.999 calibration on 256 training images" in text
    assert "Kernels rounded to the INT8 weight grid in training: yes" in text
    assert json.loads(json_path.read_text())["files"]["m-fp32.onnx"]["weights"] == {"float16": 1.0}
    assert "| m-fp32.onnx | " in text and " | float16 100% | `" in text


def test_pooled_per_scanner_auc_comes_from_the_folds_predictions(tmp_path):
    from training.runfolder import HeldOutPredictions

    rng = np.random.default_rng(0)
    files = []
    for k in range(3):
        labels = rng.choice(["benign", "malignant"], 40)
        malignant = (labels == "malignant") * 0.3 + rng.uniform(0, 0.7, 40)  # AUC below 1
        probs = np.stack([np.zeros(40), 1 - malignant, malignant], axis=1)
        predictions = HeldOutPredictions(
            [f"f{k}-{i}.png" for i in range(40)],
            ["busbra"] * 40,
            ["GE Logiq 5"] * 20 + ["Toshiba"] * 20,
            list(labels),
            probs,
            CLASSES,
        )
        files.append(predictions.write(tmp_path / f"fold{k}.csv"))
    pooled = HeldOutPredictions.read(files)
    assert len(pooled.paths) == 120 and pooled.class_names == CLASSES
    np.testing.assert_allclose(pooled.probabilities[80:], probs, atol=1e-6)  # the last fold
    folds = [_metrics(s) for s in (1, 2, 3)]
    fold_sources = [{"by_source": {"busbra": f}} for f in folds]
    report = cross_validation_report(folds, fold_sources, ["busbra"], pooled)
    aucs = report["benign_vs_malignant_auc_by_device_pooled"]
    assert sorted(aucs) == ["busbra:GE Logiq 5", "busbra:Toshiba"]
    assert aucs["busbra:Toshiba"]["n"] == 60
    assert 0.5 < aucs["busbra:Toshiba"]["auc"] < 1.0
    info = RunInfo(CLASSES, 224, "letterbox", "efficientnet-lite0", 0, "f" * 64)
    card = build_card("m", info, [], [], {}, {"cross_validation": report})
    text = render_markdown(card)
    assert "all folds' held-out predictions pooled (95% bootstrap CI)" in text
    low, high = aucs["busbra:Toshiba"]["ci95"]
    assert (
        f"- busbra:Toshiba: {aucs['busbra:Toshiba']['auc']:.3f} ({low:.3f}-{high:.3f}; 60 scans"
        in text
    )


def test_card_of_a_model_that_never_predicts_a_class_says_n_a_instead_of_crashing(tmp_path):
    labels = np.array([0, 1, 2] * 4)
    probs = np.tile([0.2, 0.5, 0.3], (12, 1))  # a chance model: always benign
    metrics = evaluate(labels, probs, CLASSES, n_boot=20)
    assert metrics["per_class"]["normal"]["precision"] is None
    info = RunInfo(CLASSES, 64, "letterbox", "small-cnn", 0, "f" * 64, test_metrics=metrics)
    model = _model_file(tmp_path / "m-int8.onnx", np.int8)
    gate = reduced_precision_gate("onnx-int8 vs onnx-fp32", probs, probs, labels)
    text = render_markdown(build_card("m", info, [model], [gate], {}))
    assert "| normal | 0.000 | 1.000 | n/a | 0.000 | 4 |" in text
    assert "n/a: undefined on this test split" in text


def test_card_carries_the_scanner_held_out_protocol_from_the_run_folder(tmp_path):
    import json

    from training.runfolder import PROTOCOL_FILE, read_reports

    protocol = {
        "busi:GE LOGIQ E9": {
            "scans": 612,
            "accuracy": 0.72,
            "malignant_sensitivity": 0.74,
            "normal_recall": 0.23,
            "malignant_auc": {"auc": 0.897, "ci95": [0.867, 0.927]},
            "normal_by_mask_head": {"normal_recall": 0.29},
        },
        "busbra:Toshiba": {"scans": 300, "accuracy": 0.8, "malignant_sensitivity": 0.9},
    }
    (tmp_path / PROTOCOL_FILE).write_text(json.dumps(protocol))
    reports = read_reports(tmp_path)
    assert reports == {"protocol": protocol}
    info = RunInfo(CLASSES, 160, "letterbox", "efficientnet-lite0", 0, "f" * 64)
    text = render_markdown(build_card("m", info, [], [], {}, reports))
    assert "| busi:GE LOGIQ E9 | 612 | 0.720 | 0.740 | 0.897 (0.867-0.927) | 0.230 |" in text
    assert "called 23% of that scanner's normal scans normal and 74% of its cancers" in text
    assert "with the lesion head deciding normal, as the runtime does, 29% of its normal" in text
    assert text.count("left out of training") == 1  # no normal scans, no sentence for Toshiba


def test_the_card_reports_the_held_out_scans_as_the_runtime_calls_them():
    from export.call_rules import runtime_calls

    info = RunInfo(CLASSES, 16, "letterbox", "efficientnet-lite0", 0, "f" * 64, lesion_stride=4)
    # rows: a normal scan the classifier calls benign but with no lesion pixel (normal by the
    # lesion head); a malignant scan below top-1 but above the operating point; a benign scan
    probabilities = np.array([[0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.1, 0.8, 0.1]], np.float32)
    labels = np.array([0, 2, 1])
    maps = np.zeros((3, 4, 4, 1), np.float32)
    maps[1:, 1:3, 1:3] = 0.9  # lesions on the two lesion scans
    calls = runtime_calls(info, probabilities, labels, 0.25, maps, sources=["a", "b", "b"])
    assert calls["accuracy"] == 1.0 and calls["normal_rule"] == "lesion_head"
    assert calls["by_source"] == {
        "a": {"scans": 1, "accuracy": 1.0},
        "b": {"scans": 2, "accuracy": 1.0},
    }
    assert calls["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    top1 = runtime_calls(info, probabilities, labels, 0.0)  # no rules: the classifier's top-1
    assert top1["recall"] == {"normal": 0.0, "benign": 1.0, "malignant": 0.0}
    assert "by_source" not in top1
    by_source = runtime_calls(info, probabilities, labels, 0.0, sources=["a", "b", "b"])
    assert by_source["by_source"]["a"]["accuracy"] == 0.0  # the normal scan, called benign
    assert by_source["by_source"]["b"] == {"scans": 2, "accuracy": 0.5}
    point = {
        "malignant_operating_point": {
            "threshold": 0.25,
            "min_sensitivity": 0.9,
            "sensitivity": 1.0,
            "specificity": 1.0,
            "scans": 3,
            "malignant_scans": 1,
            "top1_sensitivity": 0.0,
            "top1_specificity": 1.0,
        }
    }
    with_point = build_card("m", info, [], [], {}, decision=point, runtime_calls=calls)
    text = render_markdown(with_point)
    assert "As the runtime calls them (held-out test split, 3 scans)" in text
    assert "the malignant operating point above, and normal exactly where the lesion head" in text
    assert "a: accuracy 1.000 (1 scans). b: accuracy 1.000 (2 scans)." in text
    text = render_markdown(build_card("m", info, [], [], {}, runtime_calls=top1))
    assert "operating point above" not in text
    assert "top-1 between benign and malignant (no operating point was chosen)" in text


def test_the_card_says_how_the_lesion_threshold_was_chosen():
    from training.evaluation.lesion_metrics import LesionScore, summarize

    score = LesionScore("benign", "s", "d", 0.8, 0.7, 0.1, 0.9, True, True)
    metrics = {**_metrics(0), "lesion": summarize([score])}
    metrics["lesion"]["threshold"] = {
        "value": 0.35,
        "rule": "the highest mean validation Dice",
        "validation": [
            {"threshold": 0.3, "dice": 0.70, "normal_with_lesion": 0.2},
            {"threshold": 0.35, "dice": 0.72, "normal_with_lesion": 0.1},
        ],
    }
    info = RunInfo(
        CLASSES,
        16,
        "letterbox",
        "efficientnet-lite0",
        0,
        "f" * 64,
        lesion_stride=4,
        test_metrics=metrics,
    )
    text = render_markdown(build_card("m", info, [], [], {}))
    assert (
        "Lesion threshold 0.35, chosen on validation scans: the highest mean validation Dice "
        "(validation: Dice 0.720, normals with a lesion 0.100)." in text
    )


def test_the_card_of_an_fp32_only_export_says_it_has_no_int8_model(tmp_path):
    """What export writes as the quantization record with --precision fp32."""
    info = RunInfo(CLASSES, 64, "letterbox", "small-cnn", 0, "f" * 64, test_metrics=_metrics(0))
    model = _model_file(tmp_path / "m-fp32.onnx")
    card = build_card("m", info, [model], [], {"int8": "not written (--precision fp32)"})
    text = render_markdown(card)
    assert "## INT8 quantization\n\n- INT8 model not written (--precision fp32)\n" in text
    assert "activations None" not in text and "calibration on None" not in text


def test_a_clinic_trained_two_class_card_says_only_what_is_true_of_its_run():
    """Classes and training data come from the run: no normal class, no public dataset."""
    from export.call_rules import runtime_calls

    classes = ("benign", "malignant")
    info = RunInfo(classes, 64, "letterbox", "small-cnn", 0, "f" * 64, sources=("clinic",))
    probabilities = np.array([[0.8, 0.2], [0.3, 0.7]], np.float32)
    calls = runtime_calls(info, probabilities, np.array([0, 1]), 0.0)
    card = build_card("m", info, [], [], {}, runtime_calls=calls)
    text = render_markdown(card)
    assert "image classification (benign / malignant) on a device host" in text
    assert "Trained on data from clinic; performance on other scanners" in text
    assert (
        "the model's rules: top-1 between benign and malignant (no operating point was chosen). "
        "So called, accuracy 1.000" in text
    )
    for false in ("normal", "public", "BUSI", "BUS-BRA", "a few scanners and sites"):
        assert false not in text, false


def test_the_card_names_the_public_datasets_only_where_they_are_the_training_data():
    three = RunInfo(CLASSES, 64, "letterbox", "small-cnn", 0, "f" * 64, sources=("clinic",))
    text = render_markdown(build_card("m", three, [], [], {}))
    assert "image classification (normal / benign / malignant) on a device host" in text
    assert "Trained on data from clinic;" in text and "BUS" not in text
    assert "`python -m training.probes.lesionfree` (lesion-free tissue called normal" in text
    public = RunInfo(CLASSES, 64, "letterbox", "small-cnn", 0, "f" * 64, sources=("busi", "busbra"))
    text = render_markdown(build_card("m", public, [], [], {}))
    assert "Trained on the public datasets BUSI and BUS-BRA;" in text
    assert "BUS-BRA has no normal class, so the model may call a scan abnormal" in text
    mixed = RunInfo(CLASSES, 64, "letterbox", "small-cnn", 0, "f" * 64, sources=("site", "busi"))
    text = render_markdown(build_card("m", mixed, [], [], {}))
    assert "Trained on data from site and the public dataset BUSI;" in text
    assert "BUS-BRA" not in text
