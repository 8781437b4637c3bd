"""Optimized graphs kept on disk (edge_runtime.model.session_cache): the same session, faster."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.model import session_cache
from edge_runtime.model.card import file_sha256
from edge_runtime.model.contract import ContractError
from edge_runtime.model.session import Provider, open_model
from tests.onnx_models import make_contract_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(session_cache.CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def opened(monkeypatch) -> list:
    """The files onnxruntime sessions were made from, and their optimization levels."""
    made = []
    real = ort.InferenceSession

    def recording(path, sess_options=None, providers=None):
        made.append((str(path), sess_options.graph_optimization_level))
        return real(path, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    return made


def _outputs(loaded, images):
    return loaded.session.run(None, {"image": images})


def test_a_second_session_loads_the_saved_graph_and_answers_the_same(tmp_path, cache, opened):
    model = make_contract_model(tmp_path / "m.onnx", lesion_stride=4, features=True)
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 1), np.uint8)
    first = open_model(model, provider=Provider.CPU)
    saved = list(cache.glob("*.ort"))
    assert len(saved) == 1 and not list(cache.glob("*.part"))
    second = open_model(model, provider=Provider.CPU)
    assert opened[-1] == (str(saved[0]), ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert second.spec == first.spec and second.path == model
    for a, b in zip(_outputs(first, images), _outputs(second, images), strict=True):
        np.testing.assert_array_equal(a, b)


def test_another_model_or_thread_count_never_reads_that_graph(tmp_path, cache, opened):
    one = make_contract_model(tmp_path / "one.onnx", seed=0)
    other = make_contract_model(tmp_path / "other.onnx", seed=1)
    open_model(one, provider=Provider.CPU)
    open_model(other, provider=Provider.CPU)
    open_model(one, provider=Provider.CPU, threads=1)
    assert len(list(cache.glob("*.ort"))) == 3
    assert all(level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL for _, level in opened)
    # the same bytes under another name is the same model: its graph is read
    (tmp_path / "copy.onnx").write_bytes(one.read_bytes())
    open_model(tmp_path / "copy.onnx", provider=Provider.CPU)
    assert opened[-1][1] == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert file_sha256(tmp_path / "copy.onnx") == file_sha256(one)


def test_a_damaged_cached_graph_is_optimized_again(tmp_path, cache):
    model = make_contract_model(tmp_path / "m.onnx")
    open_model(model, provider=Provider.CPU)
    (saved,) = cache.glob("*.ort")
    saved.write_bytes(b"half a graph")
    loaded = open_model(model, provider=Provider.CPU)
    assert loaded.session.run(None, {"image": np.zeros((1, 64, 64, 1), np.uint8)})
    assert saved.stat().st_size > 100  # written again, whole


def test_a_cache_that_cannot_be_written_or_is_off_costs_nothing_but_time(
    tmp_path, monkeypatch, opened
):
    model = make_contract_model(tmp_path / "m.onnx")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(session_cache.CACHE_ENV, str(blocked / "cache"))
    assert open_model(model, provider=Provider.CPU).spec is not None
    monkeypatch.setenv(session_cache.CACHE_ENV, "off")
    assert session_cache.cache_dir() is None
    assert open_model(model, provider=Provider.CPU).spec is not None
    assert [path for path, _ in opened] == [str(model), str(model)]


def test_exact_int8_sessions_are_not_cached(tmp_path, cache):
    model = make_contract_model(tmp_path / "m.onnx")
    open_model(model, provider=Provider.CPU, exact_int8=True)  # an FP32 model: optimized
    assert len(list(cache.glob("*.ort"))) == 1
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    made = []
    session_cache.create_cached_session(
        model, "0" * 64, options, ["CPUExecutionProvider"], lambda *a: made.append(a)
    )
    assert len(made) == 1 and made[0][0] == model  # the model itself, as asked
    assert len(list(cache.glob("*.ort"))) == 1


def test_a_card_names_the_graph_loaded_beside_the_hash_and_a_changed_file_is_refused(
    tmp_path, cache, opened
):
    model = make_contract_model(tmp_path / "m-int8.onnx", seed=0)
    card = tmp_path / "m.card.json"
    card.write_text(json.dumps({"files": {model.name: {"sha256": file_sha256(model)}}}))
    open_model(model, provider=Provider.CPU)
    (saved,) = cache.glob("*.ort")
    open_model(model, provider=Provider.CPU)
    assert opened[-1] == (str(saved), ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    make_contract_model(model, seed=1)  # other bytes; the card still lists the first file's
    with pytest.raises(ContractError, match="does not match"):
        open_model(model, provider=Provider.CPU)
    assert list(cache.glob("*.ort")) == [saved]  # nothing kept under a SHA-256 not the file's
    assert all(level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL for _, level in opened[1:])
