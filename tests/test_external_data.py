"""Models whose weights lie in ONNX external-data files: split, read as one model, checked."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.model.card import (
    card_path_for,
    file_record,
    model_sha256,
    verify_against_card,
)
from edge_runtime.model.contract import ContractError, ModelSpec, Precision
from edge_runtime.model.external_data import external_data_files
from edge_runtime.model.session import Provider, open_model, open_recheck_model
from export.external_data import split_external_data
from tests.onnx_models import CLASSES, head_feature_count, make_contract_model, make_head_model

SIZE = 64
LIMIT = 5000  # bytes: w1 (4,096) alone, then w2 and w3 (1,024 + 1,728) together
BUNDLED_CARD = Path(__file__).resolve().parents[1] / "edge_runtime/models/default.card.json"


def _model(path: Path, *, seed: int = 0, spec: ModelSpec | None = None) -> Path:
    """A contract model with three initializers of 1 KB or more: image -> Conv w1 [16,1,8,8]
    stride 8 -> Relu -> Conv w2 [16,16,1,1] -> Relu -> Conv w3 [3,16,3,3] -> cam and, pooled,
    probabilities."""
    spec = spec or ModelSpec(class_names=CLASSES, input_size=SIZE)
    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.normal(0, 1, (16, 1, 8, 8)),
        "w2": rng.normal(0, 0.3, (16, 16, 1, 1)),
        "w3": rng.normal(0, 0.3, (3, 16, 3, 3)),
    }
    inits = [numpy_helper.from_array(np.array(1 / 255.0, np.float32), "scale")]
    inits += [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()]
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("Transpose", ["xs"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w1"], ["f1"], strides=[8, 8]),
        helper.make_node("Relu", ["f1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["f2"]),
        helper.make_node("Relu", ["f2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["f3"], pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["f3"], ["cam"], perm=[0, 2, 3, 1]),
        helper.make_node("ReduceMean", ["f3"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("Softmax", ["pooled"], ["probabilities"], axis=1),
    ]
    side = SIZE // 8
    graph = helper.make_graph(
        nodes,
        "split_test",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", SIZE, SIZE, 1])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", side, side, 3]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in spec.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def _squares(n: int = 4) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, SIZE, SIZE, 1), dtype=np.uint8)


def _outputs(path: Path) -> list[np.ndarray]:
    session = open_model(path, provider=Provider.CPU, threads=1).session
    return session.run(None, {"image": _squares()})


def _split(tmp_path: Path, name: str = "m-fp32.onnx", seed: int = 0) -> tuple[Path, list[Path]]:
    folder = tmp_path / f"split-{seed}"
    folder.mkdir()
    path = _model(folder / name, seed=seed)
    return path, split_external_data(path, LIMIT)


def test_split_keeps_every_file_within_the_limit_and_lists_the_pieces(tmp_path):
    path, pieces = _split(tmp_path)
    assert [p.name for p in pieces] == ["m-fp32.onnx.data1", "m-fp32.onnx.data2"]
    assert external_data_files(path) == pieces
    assert all(p.stat().st_size <= LIMIT for p in (path, *pieces))
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [path.name, *(p.name for p in pieces)]
    )
    whole = onnx.load(str(path))  # onnx reads it as one model
    assert sorted(t.name for t in whole.graph.initializer) == ["scale", "w1", "w2", "w3"]


def test_a_model_in_one_file_lists_no_external_data(tmp_path):
    assert external_data_files(_model(tmp_path / "m.onnx")) == []


def test_a_truncated_model_file_is_not_read_as_one_without_external_data(tmp_path):
    from edge_runtime.model.onnx_meta import MetadataError

    path, _ = _split(tmp_path)
    path.write_bytes(path.read_bytes()[:-200])  # its last fields cut off
    with pytest.raises(MetadataError, match="truncated"):
        external_data_files(path)


def test_split_model_gives_the_unsplit_models_outputs_through_open_model(tmp_path):
    whole = _model(tmp_path / "whole.onnx")
    path, _ = _split(tmp_path)
    for got, expected in zip(_outputs(path), _outputs(whole), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_split_refuses_an_initializer_over_the_limit_and_changes_nothing(tmp_path):
    path = _model(tmp_path / "m.onnx")
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"initializer 'w1' is 4,096 bytes, over the 4,000"):
        split_external_data(path, 4000)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_split_refuses_a_graph_over_the_limit_and_changes_nothing(tmp_path):
    bloated = ModelSpec(class_names=CLASSES, input_size=SIZE, metrics={"notes": "x" * LIMIT})
    path = _model(tmp_path / "m-fp32.onnx", spec=bloated)
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    with pytest.raises(ValueError, match=r"m-fp32.onnx: .* bytes without its initializers"):
        split_external_data(path, LIMIT)
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before


def test_pieces_get_the_model_files_permissions(tmp_path):
    path = _model(tmp_path / "m.onnx")
    path.chmod(0o644)
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in split_external_data(path, LIMIT))


def test_a_split_model_split_again_replaces_its_pieces(tmp_path):
    path, _ = _split(tmp_path)
    pieces = split_external_data(path, 10_000)
    assert [p.name for p in pieces] == ["m-fp32.onnx.data1"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["m-fp32.onnx", "m-fp32.onnx.data1"]
    assert pieces[0].stat().st_size == 4096 + 1024 + 1728


def test_a_missing_piece_is_named_with_its_model(tmp_path):
    path, pieces = _split(tmp_path)
    pieces[1].unlink()
    message = rf"{path}: .*m-fp32.onnx.data2 is missing"
    with pytest.raises(FileNotFoundError, match=message):
        open_model(path)
    with pytest.raises(FileNotFoundError, match=message):
        model_sha256(path)
    for piece in pieces:
        piece.unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=r"data1, m-fp32.onnx.data2 are missing"):
        open_model(path)


def test_a_location_outside_the_models_folder_is_refused(tmp_path):
    path, _ = _split(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[1].external_data:
        if entry.key == "location":
            entry.value = "../elsewhere.bin"
    onnx.save(model, str(path))
    with pytest.raises(ContractError, match=r"'\.\./elsewhere\.bin', which is not a file beside"):
        open_model(path)


def _card(path: Path) -> Path:
    card = {"files": {path.name: file_record(path)}}
    card_path = card_path_for(path)
    card_path.write_text(json.dumps(card))
    return card_path


def test_the_card_record_covers_the_pieces_and_a_damaged_piece_is_named(tmp_path):
    path, pieces = _split(tmp_path)
    _card(path)
    record = json.loads(card_path_for(path).read_text())["files"][path.name]
    assert sorted(record["external_data"]) == [p.name for p in pieces]
    assert record["external_data"][pieces[0].name]["bytes"] == pieces[0].stat().st_size
    assert verify_against_card(path)
    open_model(path)
    data = bytearray(pieces[1].read_bytes())
    data[10] ^= 0xFF
    pieces[1].write_bytes(bytes(data))
    message = rf"{pieces[1]}: SHA-256 .* does not match .* of m-fp32.onnx\)"
    with pytest.raises(ContractError, match=message):
        verify_against_card(path)
    with pytest.raises(ContractError, match=message):
        open_model(path)


def test_a_one_file_models_card_record_and_digest_are_unchanged(tmp_path):
    from edge_runtime.model.card import file_sha256

    path = _model(tmp_path / "m.onnx")
    assert "external_data" not in file_record(path)
    assert model_sha256(path) == file_sha256(path)


def test_the_model_digest_changes_with_a_piece(tmp_path):
    path, pieces = _split(tmp_path)
    before = model_sha256(path)
    data = bytearray(pieces[0].read_bytes())
    data[0] ^= 0xFF
    pieces[0].write_bytes(bytes(data))
    assert model_sha256(path) != before


def test_a_cached_graph_is_never_used_for_other_pieces(tmp_path):
    """The optimized graph kept on disk holds the weights: it is keyed on the pieces too."""
    path, pieces = _split(tmp_path, seed=0)
    other, other_pieces = _split(tmp_path, seed=1)  # the same layout, other weights
    first = _outputs(path)
    assert np.abs(first[0] - _outputs(other)[0]).max() > 1e-3
    for mine, theirs in zip(pieces, other_pieces, strict=True):
        shutil.copyfile(theirs, mine)
    np.testing.assert_array_equal(_outputs(path)[0], _outputs(other)[0])


def _pair(folder: Path, stem: str = "m") -> tuple[Path, Path]:
    """An INT8-labelled model (small: no initializer of 1 KB) and its FP32 recheck partner."""
    fp32 = _model(folder / f"{stem}-fp32.onnx")
    spec = ModelSpec(
        class_names=CLASSES,
        input_size=SIZE,
        precision=Precision.INT8,
        recheck_margin=0.2,
        recheck_model=fp32.name,
    )
    return make_contract_model(folder / f"{stem}-int8.onnx", size=SIZE, spec=spec), fp32


@pytest.mark.parametrize("with_card", [False, True])
def test_a_split_recheck_partner_is_found_and_a_missing_piece_named_at_start(tmp_path, with_card):
    int8, fp32 = _pair(tmp_path)
    pieces = split_external_data(fp32, LIMIT)
    if with_card:  # the card's SHA-256 check reads the pieces then
        _card(fp32)
    partner = open_recheck_model(open_model(int8), provider=Provider.CPU)
    assert partner is not None
    partner.load()
    pieces[0].unlink()
    with pytest.raises(FileNotFoundError, match=r"m-fp32.onnx: .*m-fp32.onnx.data1 is missing"):
        open_recheck_model(open_model(int8), provider=Provider.CPU)


def test_quantizing_a_split_fp32_model_gives_the_unsplit_models_int8(tmp_path):
    """``python -m export.requantize`` quantizes the bundled FP32 file, split or not."""
    from export.quant_config import QuantConfig
    from export.quantize import quantize_int8

    int8s = []
    for folder in ("whole", "split"):
        (tmp_path / folder).mkdir()
        fp32 = _model(tmp_path / folder / "m-fp32.onnx")
        if folder == "split":
            split_external_data(fp32, LIMIT)
        int8 = quantize_int8(fp32, tmp_path / folder / "m-int8.onnx", _squares(8), QuantConfig())
        int8s.append({t.name: t.raw_data for t in onnx.load(str(int8)).graph.initializer})
    assert int8s[0] == int8s[1]


def test_ray_actors_get_the_pieces_of_the_model_and_its_partner(tmp_path):
    from edge_runtime.app.ray_engine import _model_files
    from edge_runtime.classifier import Classifier

    int8, fp32 = _pair(tmp_path)
    pieces = split_external_data(fp32, LIMIT)
    with Classifier.from_path(int8, provider=Provider.CPU) as classifier:
        files = _model_files(classifier)
    assert sorted(files) == sorted([int8.name, fp32.name, *(p.name for p in pieces)])
    assert files[pieces[0].name] == pieces[0].read_bytes()


def test_adapt_reads_a_split_parent_and_names_a_missing_piece(tmp_path):
    from edge_runtime.adapt.parent import load_parent

    d, k = head_feature_count(), len(CLASSES)
    kernel = np.random.default_rng(0).normal(0, 1, (d, k)).astype(np.float32)
    path = make_head_model(tmp_path / "p-fp32.onnx", kernel, np.zeros(k, np.float32), size=SIZE)
    whole = load_parent(path)
    pieces = split_external_data(path, 3000)
    assert pieces, "the head model has an initializer of 1 KB or more"
    parent = load_parent(path)
    np.testing.assert_array_equal(parent.head.kernel, whole.head.kernel)
    assert parent.sha256 == model_sha256(path) != whole.sha256
    assert {t.name: t.raw_data for t in parent.proto.graph.initializer} == {
        t.name: t.raw_data for t in whole.proto.graph.initializer
    }
    pieces[0].unlink()
    with pytest.raises(FileNotFoundError, match=r"p-fp32.onnx: .*p-fp32.onnx.data1 is missing"):
        load_parent(path)


def _run_folder(root: Path) -> Path:
    """A run folder as ``export.bundle`` reads it: the exported pair, its card, a split.csv."""
    export = root / "run" / "export"
    export.mkdir(parents=True)
    int8, fp32 = _pair(export, "default")
    card = json.loads(BUNDLED_CARD.read_text())  # the fields the Markdown card needs, small
    card.update(evaluation={}, by_source={}, protocol={}, parity=[], limitations=[])
    card["files"] = {p.name: file_record(p) for p in (fp32, int8)}
    from export.card import write_card

    write_card(card, export)
    scan = root / "data" / "benign" / "a.png"
    scan.parent.mkdir(parents=True)
    scan.write_bytes(b"")
    with open(root / "run" / "split.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "source"])
        writer.writerow([scan, "benign", "test", "busi"])
    return root / "run"


def test_bundle_leaves_a_pair_under_the_limit_byte_identical(tmp_path, monkeypatch):
    from export import bundle as bundling

    run = _run_folder(tmp_path)
    models = tmp_path / "models"
    with monkeypatch.context() as patch:  # bundled split before: its pieces are removed
        patch.setattr(bundling, "MAX_FILE_BYTES", LIMIT)
        bundling.bundle(run, tmp_path / "data", models_dir=models, docs_dir=tmp_path / "docs")
    assert (models / "default-fp32.onnx.data1").is_file()
    bundling.bundle(run, tmp_path / "data", models_dir=models, docs_dir=tmp_path / "docs")
    names = ["default-fp32.onnx", "default-int8.onnx", "default.card.json", "default.card.md"]
    assert sorted(p.name for p in models.iterdir()) == [*names, "default.heldout.csv"]
    for name in names:
        assert (models / name).read_bytes() == (run / "export" / name).read_bytes()


def test_bundle_splits_an_fp32_partner_over_the_limit(tmp_path, monkeypatch):
    from export import bundle as bundling

    run = _run_folder(tmp_path)
    fp32 = run / "export" / "default-fp32.onnx"
    limit = fp32.stat().st_size - 1
    monkeypatch.setattr(bundling, "MAX_FILE_BYTES", limit)
    models = tmp_path / "models"
    written = bundling.bundle(run, tmp_path / "data", models_dir=models, docs_dir=tmp_path / "d")
    pieces = external_data_files(models / fp32.name)
    assert [p.name for p in pieces] == ["default-fp32.onnx.data1"]
    assert set(pieces) <= set(written)
    assert all(p.stat().st_size <= limit for p in models.iterdir())
    assert verify_against_card(models / fp32.name)
    assert verify_against_card(models / "default-int8.onnx")
    assert (run / "export" / fp32.name).stat().st_size == limit + 1  # the export is untouched
    card_md = (models / "default.card.md").read_text()
    assert file_record(models / fp32.name)["sha256"] in card_md
    piece_sha256 = file_record(models / fp32.name)["external_data"][pieces[0].name]["sha256"]
    assert f"| {pieces[0].name} (weights of {fp32.name}) |" in card_md and piece_sha256 in card_md
    for got, expected in zip(_outputs(models / fp32.name), _outputs(fp32), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_bundle_refuses_an_initializer_over_the_limit_and_copies_nothing(tmp_path, monkeypatch):
    from export import bundle as bundling

    run = _run_folder(tmp_path)
    monkeypatch.setattr(bundling, "MAX_FILE_BYTES", 4000)
    models = tmp_path / "models"
    with pytest.raises(ValueError, match=r"initializer 'w1' is 4,096 bytes"):
        bundling.bundle(run, tmp_path / "data", models_dir=models, docs_dir=tmp_path / "docs")
    assert not models.exists()
