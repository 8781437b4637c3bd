"""Ensembles and flip test-time augmentation as one graph (training.model.ensemble,
training.ensemble): the outputs they promise and what they refuse. The README's synthetic run
combined, reported and exported: tests/test_end_to_end.py."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from training.ensemble import build_ensemble_run, main  # noqa: E402
from training.model.backbones import Backbone  # noqa: E402
from training.model.classifier import build_classifier  # noqa: E402
from training.model.ensemble import combine  # noqa: E402


def _member(size: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return build_classifier(
        3, backbone=Backbone.SMALL_CNN, input_size=size, weights=None, lesion=True
    )


def _scans(size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, size, size, 1)).astype("uint8")


def test_mirroring_averages_the_scan_and_its_mirror_and_mirrors_the_maps_back():
    member = _member(64, 0)
    scans = _scans(64)
    plain, mirrored = member.predict(scans, verbose=0), member.predict(scans[:, :, ::-1], verbose=0)

    out = combine([member], 64, mirror=True).predict(scans, verbose=0)

    for name in ("probabilities", "features"):
        np.testing.assert_allclose(out[name], (plain[name] + mirrored[name]) / 2, atol=1e-6)
    for name in ("lesion", "cam"):
        expected = (plain[name] + mirrored[name][:, :, ::-1]) / 2
        np.testing.assert_allclose(out[name], expected, atol=1e-6)


def test_members_of_other_sizes_get_the_input_resized_and_their_maps_on_the_ensemble_grid():
    small, large = _member(64, 0), _member(96, 1)
    scans = _scans(96)

    out = combine([small, large], 96, mirror=False).predict(scans, verbose=0)

    alone = large.predict(scans, verbose=0)
    assert out["lesion"].shape == (3, 24, 24, 1) and out["cam"].shape == (3, 6, 6, 3)
    assert out["features"].shape == (3, 2 * alone["features"].shape[1])
    np.testing.assert_allclose(
        out["features"][:, -alone["features"].shape[1] :], alone["features"], atol=1e-5
    )
    assert not np.allclose(out["probabilities"], alone["probabilities"], atol=1e-4)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(("source", "size"), [(5, 7), (20, 28), (112, 80), (7, 5)])
def test_the_resize_between_member_grids_is_keras_bilinear_resize(source, size):
    from training.model.layers import ResizeSquare

    grid = np.random.default_rng(1).random((2, source, source, 3)).astype("float32")
    expected = keras.ops.image.resize(grid, (size, size), interpolation="bilinear")
    np.testing.assert_allclose(ResizeSquare(size)(grid), expected, atol=1e-5)


def test_an_ensemble_of_members_at_80_and_112_px_exports_to_onnx_with_its_keras_outputs(tmp_path):
    """5 -> 7 and 20 -> 28 grids: tf2onnx's Resize with float scales computed 6 and 27 (floor of
    5 * float32(1.4)), and onnxruntime refused the file."""
    import onnxruntime as ort

    from export.convert import keras_to_onnx

    model = combine([_member(80, 0), _member(112, 1)], 112, mirror=False, lesion_from=[0])
    scans = _scans(112)
    expected = model.predict(scans, verbose=0)
    path = keras_to_onnx(model, 112, tmp_path / "ensemble.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    static = {o.name: o.shape[1:] for o in session.get_outputs()}  # what the contract checks
    assert static["lesion"] == [28, 28, 1] and static["cam"] == [7, 7, 3]
    got = dict(zip(names, session.run(None, {"image": scans}), strict=True))
    assert got["cam"].shape == (3, 7, 7, 3) and got["lesion"].shape == (3, 28, 28, 1)
    for name in ("probabilities", "cam", "lesion", "features"):
        np.testing.assert_allclose(got[name], expected[name], atol=1e-4, err_msg=name)


def test_an_ensemble_survives_saving_and_loading(tmp_path):
    from training.model.classifier import load_classifier

    model = combine([_member(64, 0), _member(96, 1)], 96, mirror=True)
    model.save(tmp_path / "model.keras")
    scans = _scans(96)

    again = load_classifier(tmp_path / "model.keras").predict(scans, verbose=0)

    for name, value in model.predict(scans, verbose=0).items():
        np.testing.assert_array_equal(again[name], value)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [((64,), "multiple of 4"), ((), "at least one member")],
)
def test_combine_refuses_what_it_cannot_build(sizes, message):
    with pytest.raises(ValueError, match=message):
        combine([_member(s, 0) for s in sizes], 66 if sizes else 64, mirror=False)


def test_members_with_different_splits_are_refused(tmp_path):
    from training.run import TrainConfig
    from training.runfolder import RunInfo

    members = []
    for i in range(2):
        run = tmp_path / f"m{i}"
        run.mkdir()
        _member(64, i).save(run / "model.keras")
        (run / "split.csv").write_text(f"path,split\na.png,{('train', 'test')[i]}\n")
        (run / "history.csv").write_text("stage,loss\nfrozen,1.0\n")
        RunInfo(("normal", "benign", "malignant"), 64, "letterbox", "small-cnn", 0, "x").write(run)
        members.append(run)

    with pytest.raises(ValueError, match=r"the members' split.csv differ"):
        config = TrainConfig(data=(tmp_path,), output=tmp_path / "out", input_size=64)
        build_ensemble_run(config, members, mirror=False)
    assert (
        main(
            [
                str(tmp_path),
                "--member",
                str(members[0]),
                "--member",
                str(members[1]),
                "--output",
                str(tmp_path / "o"),
                "--image-size",
                "64",
            ]
        )
        == 2
    )
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_the_lesion_map_can_come_from_some_members_only():
    first, second = _member(64, 0), _member(64, 1)
    scans = _scans(64)

    out = combine([first, second], 64, mirror=False, lesion_from=[0]).predict(scans, verbose=0)

    alone = [m.predict(scans, verbose=0) for m in (first, second)]
    np.testing.assert_allclose(out["lesion"], alone[0]["lesion"], atol=1e-6)
    mean = (alone[0]["probabilities"] + alone[1]["probabilities"]) / 2
    np.testing.assert_allclose(out["probabilities"], mean, atol=1e-6)
    with pytest.raises(ValueError, match=r"lesion_from must name members 0\.\.1"):
        combine([first, second], 64, mirror=False, lesion_from=[2])


def test_the_command_hands_every_option_to_the_build(monkeypatch, tmp_path):
    import training.ensemble as command

    seen = {}
    monkeypatch.setattr(command, "build_ensemble_run", lambda *args: seen.setdefault("args", args))
    argv = [str(tmp_path), "--member", "a", "--member", "b", "--output", "o", "--image-size", "64"]

    assert main([*argv, "--mirror", "--lesion-from", "1"]) == 0

    config, members, mirror, lesion_from = seen["args"]
    assert (config.input_size, mirror, lesion_from) == (64, True, [0])
    assert [str(m) for m in members] == ["a", "b"]
    assert (config.data, str(config.output)) == ((tmp_path,), "o")


@pytest.mark.parametrize(
    ("members", "mirror", "lesion_from"),
    [
        ((("efficientnet-lite0", 160), ("efficientnet-lite2", 160)), True, [0]),
        ((("efficientnet-lite0", 160), ("efficientnet-lite2", 224)), False, None),
        ((("small-cnn", 64),), True, None),
    ],
)
def test_an_ensemble_label_reads_back(members, mirror, lesion_from):
    from types import SimpleNamespace

    from training.ensemble import ensemble_label, member_backbones, parse_label

    infos = [SimpleNamespace(backbone=b, input_size=s, lesion_stride=4) for b, s in members]
    label = ensemble_label(infos, mirror, lesion_from)
    assert parse_label(label) == (list(members), mirror, lesion_from)
    assert member_backbones(label) == [b for b, _ in members]
    assert parse_label("efficientnet-lite0") == ([("efficientnet-lite0", None)], False, None)


def test_an_ensemble_without_a_lesion_output_names_no_lesion_source():
    from types import SimpleNamespace

    from training.ensemble import ensemble_label

    pair = [("efficientnet-lite0", 160), ("efficientnet-lite2", 160)]
    infos = [SimpleNamespace(backbone=b, input_size=s, lesion_stride=0) for b, s in pair]
    label = ensemble_label(infos, False, [0])
    assert label == "efficientnet-lite0@160 + efficientnet-lite2@160"
    infos[1].lesion_stride = 4  # one member without a lesion head: the graph has no lesion output
    assert ensemble_label(infos, False, [0]) == label
