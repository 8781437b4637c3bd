"""Provider choice: what AUTO asks for, what a GPU host is told, and stdout kept clean."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.app.bench import synthetic_scans
from edge_runtime.classifier import Classifier, ClassifierOptions, default_precision
from edge_runtime.io.preprocess import make_batch
from edge_runtime.model import session
from edge_runtime.model.contract import Precision
from edge_runtime.model.session import Provider, choose_providers, open_model
from tests.onnx_models import make_contract_model

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@pytest.fixture
def gpu_build(monkeypatch):
    """onnxruntime-gpu as installed: it lists TensorRT and CUDA whatever the machine has."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])


def test_auto_asks_for_tensorrt_only_when_its_library_loads(gpu_build, monkeypatch):
    monkeypatch.setattr(session, "tensorrt_loadable", lambda: False)
    assert choose_providers(Provider.AUTO) == [CUDA, CPU]
    monkeypatch.setattr(session, "tensorrt_loadable", lambda: True)
    assert choose_providers(Provider.AUTO) == [TRT, CUDA, CPU]
    assert choose_providers(Provider.TENSORRT) == [TRT, CPU]  # asked by name: always tried


def test_provider_given_as_a_string_is_the_same_request():
    assert choose_providers("cpu") == choose_providers(Provider.CPU) == [CPU]


def test_missing_gpu_provider_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with pytest.raises(ValueError, match="pip uninstall -y onnxruntime onnxruntime-gpu"):
        choose_providers(Provider.CUDA)


def test_onnxruntime_fallback_banner_goes_to_the_log_not_stdout(
    tmp_path, monkeypatch, capsys, caplog
):
    real = ort.InferenceSession

    def falling_back(*args, **kwargs):  # what onnxruntime prints when a provider fails
        print("*************** EP Error ***************")
        print("EP Error libnvinfer.so.10: cannot open shared object file")
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", falling_back)
    with caplog.at_level(logging.WARNING, logger="edge_runtime.model.session"):
        open_model(make_contract_model(tmp_path / "m.onnx"), provider=Provider.CPU)
    assert capsys.readouterr().out == ""
    assert "libnvinfer.so.10" in caplog.text and "*****" not in caplog.text


def test_bundled_default_is_fp32_on_cuda_and_int8_elsewhere():
    assert default_precision(CUDA) is Precision.FP32
    assert default_precision(CPU, saturating_cpu=False) is Precision.INT8
    assert default_precision(TRT) is Precision.INT8


def test_bundled_default_is_fp32_on_an_x86_cpu_whose_int8_kernels_saturate():
    assert default_precision(CPU, saturating_cpu=True) is Precision.FP32
    assert default_precision(TRT, saturating_cpu=True) is Precision.INT8  # not onnxruntime's MLAS


@pytest.mark.parametrize(
    ("flags", "saturates"),
    [
        ("fpu sse2 avx avx2 fma", True),  # AVX2 only, as on Zen 2/3 or Skylake client
        ("fpu avx2 avx512f avx512_vnni", False),
        ("fpu avx2 avx_vnni", False),
        ("fp asimd asimddp", False),  # ARM: no x86 flags, no claim
    ],
)
def test_int8_saturation_is_read_from_the_cpu_flags(tmp_path, flags, saturates):
    from edge_runtime.model.cpu import int8_saturates

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert int8_saturates(cpuinfo) is saturates
    assert int8_saturates(tmp_path / "missing") is False


def test_the_cpu_vendor_is_the_first_vendor_id_of_cpuinfo(tmp_path):
    from edge_runtime.model.cpu import cpu_vendor

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu\n" * 2)
    assert cpu_vendor(cpuinfo) == "GenuineIntel"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # ARM: no vendor_id
    assert cpu_vendor(cpuinfo) == ""
    assert cpu_vendor(tmp_path / "missing") == ""


def test_bundled_default_follows_the_provider_that_actually_runs_it(monkeypatch):
    # CUDA is asked for first, but the session starts on the CPU (as when the GPU or its
    # libraries are missing): the FP32 model chosen for CUDA is swapped for INT8.
    import edge_runtime.classifier as classifier

    def cpu_only(path, *, provider, threads):
        return open_model(path, provider=Provider.CPU, threads=threads)

    monkeypatch.setattr(classifier, "choose_providers", lambda provider: [CUDA, CPU])
    monkeypatch.setattr(classifier, "int8_saturates", lambda: False)
    monkeypatch.setattr(classifier, "open_model", cpu_only)
    with Classifier.from_options(ClassifierOptions()) as clf:
        assert clf.spec.precision is Precision.INT8


cuda_only = pytest.mark.skipif(
    CUDA not in ort.get_available_providers(), reason="needs onnxruntime-gpu and an NVIDIA GPU"
)


@cuda_only
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_bundled_models_give_the_same_answers_on_cuda_as_on_cpu(precision):
    from edge_runtime.classifier import default_model_path

    path = default_model_path(precision)
    cpu, cuda = open_model(path, provider=Provider.CPU), open_model(path, provider=Provider.CUDA)
    assert cuda.providers[0] == CUDA
    batch = make_batch(synthetic_scans(64), cpu.spec.input_size, cpu.spec.resize_policy)
    on_cpu, on_cuda = (m.session.run(["probabilities"], {"image": batch})[0] for m in (cpu, cuda))
    assert np.mean(on_cpu.argmax(1) == on_cuda.argmax(1)) >= 0.98
    assert np.abs(on_cpu - on_cuda).max() < (0.01 if precision == "fp32" else 0.1)


@cuda_only
def test_default_classifier_on_cuda_is_the_fp32_model():
    with Classifier.from_options(ClassifierOptions(provider=Provider.CUDA)) as clf:
        assert clf.spec.precision is Precision.FP32


def test_classifier_default_opens_the_bundled_model_that_suits_the_host(monkeypatch):
    import edge_runtime.classifier as classifier

    for saturating, precision in ((False, Precision.INT8), (True, Precision.FP32)):
        monkeypatch.setattr(classifier, "int8_saturates", lambda s=saturating: s)
        with Classifier.default(provider=Provider.CPU, threads=1) as clf:
            assert clf.spec.precision is precision
