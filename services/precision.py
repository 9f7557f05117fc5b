"""Whether this machine multiplies bf16 natively: shared by the scorer (serving dtype) and the trainer
(mixed-precision autocast).

On CPUs with native bf16 dot products (x86 AVX512-BF16 or AMX-BF16, Arm BF16) a bf16 GEMM can run ~3x
faster than fp32 (2-core Zen 4 dev box: ~270 vs ~80 GFLOP/s); elsewhere oneDNN emulates bf16 and it
is slower than fp32.  The instruction is necessary but not sufficient: on a 2-core Xeon (family 6,
model 207) with AVX512-BF16 and no AMX, fp32 GEMMs ran at 240-295 GFLOP/s and bf16 ones at half to
two thirds of that, and the policy's forward and backward took 5.4 s a step with bf16 autocast against
3.3 s in fp32.  So :func:`cpu_bf16_support` also times a bf16 GEMM against an fp32 one (a few tens of
milliseconds, once per process) and says bf16 only where it is at least :data:`MIN_BF16_SPEEDUP`
times faster.
"""

from __future__ import annotations

import functools
import platform

import torch

#: /proc/cpuinfo flags of x86 instructions that multiply bf16 natively.
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: bf16 is chosen where the probe GEMM runs at least this much faster in bf16 than in fp32: a margin
#: over the probe's noise, and over the casts and the ops autocast leaves in fp32, which a GEMM alone
#: does not pay (measured: 3.4x on Zen 4, where bf16 wins; 0.5-0.7x on the Xeon above, where it loses).
MIN_BF16_SPEEDUP = 1.3


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


def bf16_decision(onednn_bf16: bool, machine: str, flags: set[str], cpuinfo_avx512_bf16: bool,
                  speedup: float | None = None) -> tuple[bool, str]:
    """(bf16 matmul native and faster?, why) from the facts :func:`cpu_bf16_support` gathers.

    oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) is necessary but not
    sufficient: on x86 it is true for any AVX-512 core (Skylake-X, Cascade Lake), where bf16 GEMMs are
    emulated.  So on x86 the instruction itself must be there too, from torch's cpuinfo
    (``torch.cpu._is_avx512_bf16_supported``) or the kernel's flag list; on Arm oneDNN's check already
    is the BF16 extension (FEAT_BF16).  ``speedup`` (None: not measured) is the probe GEMM's fp32 time
    over its bf16 time (:func:`gemm_bf16_speedup`); with the instruction there, bf16 is still refused
    below :data:`MIN_BF16_SPEEDUP`.
    """
    if not onednn_bf16:
        return False, "oneDNN reports no bf16 support on this CPU"
    machine = machine.lower()
    if machine in ("aarch64", "arm64"):
        has = "Arm CPU with the BF16 extension (oneDNN)"
    elif machine not in ("x86_64", "amd64"):
        return False, f"no bf16 detection for {machine or 'this'} CPUs"
    else:
        found = [f for f in X86_BF16_FLAGS if f in flags]
        if cpuinfo_avx512_bf16 and "avx512_bf16" not in found:
            found.append("avx512_bf16 (cpuinfo)")
        if not found:
            return False, "x86 CPU without avx512_bf16/amx_bf16 (bf16 would be emulated, slower than fp32)"
        has = "x86 CPU with " + ", ".join(found)
    if speedup is None:
        return True, has
    measured = f"a bf16 GEMM ran {speedup:.2f}x as fast as fp32 here"
    if speedup < MIN_BF16_SPEEDUP:
        return False, f"{has}, but {measured} (below {MIN_BF16_SPEEDUP}x): fp32"
    return True, f"{has}; {measured}"


def gemm_bf16_speedup(n: int = 512, flops: float = 1e9, rounds: int = 3) -> float:
    """fp32 time over bf16 time of an ``n``×``n`` matmul on this CPU at the current thread count (best of
    ``rounds`` rounds of about ``flops`` each per dtype; tens of milliseconds in all)."""
    import time

    a, b = torch.randn(n, n), torch.randn(n, n)
    reps = max(1, int(flops / (2 * n ** 3)))
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm oneDNN's kernel choice up
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(reps):
                x @ y
            times.append(time.perf_counter() - started)
        best[dtype] = min(times)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


@functools.lru_cache(maxsize=1)
def cpu_bf16_support() -> tuple[bool, str]:
    """(native bf16 matmul on this CPU, and faster than fp32?, why); see :func:`bf16_decision`."""
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
    facts = (onednn, platform.machine(), _cpuinfo_flags(), avx512_bf16)
    native, why = bf16_decision(*facts)
    return bf16_decision(*facts, speedup=gemm_bf16_speedup()) if native else (native, why)




def bf16_native(device: torch.device) -> bool:
    """True when bf16 math is native on ``device`` (CUDA with bf16, or a CPU as above)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return cpu_bf16_support()[0]
