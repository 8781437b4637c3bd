"""Optimized graphs kept on disk (edge_runtime.model.session_cache): the same session, faster."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

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


def test_the_folder_keeps_the_most_recently_used_graphs_and_only_its_own_names(tmp_path):
    folder = tmp_path / "shared-folder"
    folder.mkdir()
    now = time.time()

    def file(name: str, age_s: float) -> Path:
        path = folder / name
        path.write_bytes(b"x")
        os.utime(path, (now - age_s, now - age_s))
        return path

    graphs = [file(f"{i:032x}.ort", age_s=60.0 * i) for i in range(5)]  # 0: used last
    old_format = file(f"{9:032x}.onnx", age_s=0)
    stale, fresh = file("tmpab_12cd.ort.part", 7200), file("tmpef34gh56.ort.part", 10)
    others = [file("notes.txt", 1e6), file("model.onnx", 1e6), file("tmpab_12cd.ort", 1e6)]
    (folder / f"{8:032x}.ort").mkdir()  # not a file: never removed
    removed = session_cache.prune(folder, max_graphs=3)
    assert sorted(removed) == sorted([graphs[3], graphs[4], old_format, stale])
    assert all(p.exists() for p in [*graphs[:3], fresh, *others, folder / f"{8:032x}.ort"])
    assert session_cache.prune(tmp_path / "absent") == []


def test_a_loaded_graph_counts_as_used_and_saving_one_prunes_the_folder(
    tmp_path, cache, monkeypatch
):
    first = make_contract_model(tmp_path / "first.onnx", seed=0)
    open_model(first, provider=Provider.CPU)
    (kept,) = cache.glob("*.ort")
    os.utime(kept, (0, 0))  # as if last used long ago
    open_model(first, provider=Provider.CPU)  # loaded from the cache: used now
    assert kept.stat().st_mtime > time.time() - 60
    monkeypatch.setattr(session_cache, "MAX_GRAPHS", 1)
    second = make_contract_model(tmp_path / "second.onnx", seed=1)
    os.utime(kept, (0, 0))
    open_model(second, provider=Provider.CPU)  # saved, and the folder pruned to one graph
    (left,) = cache.glob("*.ort")
    assert left != kept and not kept.exists()


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
