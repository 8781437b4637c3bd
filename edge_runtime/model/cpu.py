"""What the host CPU offers that decides which precision runs right on it."""

from __future__ import annotations

import functools
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
VNNI_FLAGS = (" avx512_vnni", " avx_vnni", " amx_int8")


@functools.cache
def int8_saturates(cpuinfo: Path = CPUINFO) -> bool:
    """Whether onnxruntime's U8S8 INT8 convolutions may saturate on this CPU.

    On x86 CPUs with AVX2 but without VNNI (AVX512-VNNI, AVX-VNNI or AMX) onnxruntime sums
    u8 x s8 products in 16-bit intermediates that saturate (onnxruntime's quantization docs:
    "the VPMADDUBSW instruction ... might suffer from saturation issues"). Measured on an
    AVX2-only AMD EPYC: the bundled INT8 model with its FP32 recheck agreed with FP32 on 0.973 of
    its held-out scans (1.000 on VNNI CPUs). Read from ``/proc/cpuinfo``; False where it cannot
    be read or is not x86 (ARM's dot-product kernels do not saturate), so no claim either way.
    """
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    if " avx2" not in flags:
        return False
    return not any(flag in flags for flag in VNNI_FLAGS)


def cpu_vendor(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's maker as ``/proc/cpuinfo``'s first ``vendor_id`` names it (``GenuineIntel``,
    ``AuthenticAMD``); "" where there is none to read (not Linux, or not x86)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("vendor_id")), "")
