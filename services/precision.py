"""Whether this machine multiplies bf16 natively: shared by the scorer (serving dtype) and the trainer
(mixed-precision autocast).

On CPUs with native bf16 dot products (x86 AVX512-BF16 or AMX-BF16, Arm BF16) a bf16 GEMM runs ~3x
faster than fp32 (2-core Zen 4 dev box: ~270 vs ~80 GFLOP/s); elsewhere oneDNN emulates bf16 and it
is slower than fp32, so callers only choose bf16 when :func:`cpu_bf16_support` says the hardware has it.
"""

from __future__ import annotations

import functools
import platform

import torch

#: /proc/cpuinfo flags of x86 instructions that multiply bf16 natively.
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (x86 ``flags``, Arm ``Features``); empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def bf16_decision(onednn_bf16: bool, machine: str, flags: set[str], cpuinfo_avx512_bf16: bool) -> tuple[bool, str]:
    """(native bf16 matmul?, why) from the facts :func:`cpu_bf16_support` gathers.

    oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) is necessary but not
    sufficient: on x86 it is true for any AVX-512 core (Skylake-X, Cascade Lake), where bf16 GEMMs are
    emulated.  So on x86 the instruction itself must be there too, from torch's cpuinfo
    (``torch.cpu._is_avx512_bf16_supported``) or the kernel's flag list; on Arm oneDNN's check already
    is the BF16 extension (FEAT_BF16).
    """
    if not onednn_bf16:
        return False, "oneDNN reports no bf16 support on this CPU"
    machine = machine.lower()
    if machine in ("aarch64", "arm64"):
        return True, "Arm CPU with the BF16 extension (oneDNN)"
    if machine not in ("x86_64", "amd64"):
        return False, f"no bf16 detection for {machine or 'this'} CPUs"
    found = [f for f in X86_BF16_FLAGS if f in flags]
    if cpuinfo_avx512_bf16 and "avx512_bf16" not in found:
        found.append("avx512_bf16 (cpuinfo)")
    if found:
        return True, "x86 CPU with " + ", ".join(found)
    return False, "x86 CPU without avx512_bf16/amx_bf16 (bf16 would be emulated, slower than fp32)"


@functools.lru_cache(maxsize=1)
def cpu_bf16_support() -> tuple[bool, str]:
    """(native bf16 matmul on this CPU?, why); see :func:`bf16_decision`."""
    if not torch.backends.mkldnn.is_available():
        return False, "torch was built without oneDNN"
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        avx512_bf16 = bool(probe()) if probe is not None else False
    except RuntimeError:
        avx512_bf16 = False
    return bf16_decision(onednn, platform.machine(), _cpuinfo_flags(), avx512_bf16)




def bf16_native(device: torch.device) -> bool:
    """True when bf16 math is native on ``device`` (CUDA with bf16, or a CPU as above)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return cpu_bf16_support()[0]
