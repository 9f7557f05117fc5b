"""A description of the machine a benchmark ran on, stored in every result JSON.

Benchmarks on shared machines are only comparable with their context: CPU model, cores, memory, GPU,
and the versions of the libraries on the hot path.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from typing import Any

PACKAGES = ("torch", "transformers", "ray", "grpcio", "kafka-python", "redis", "protobuf", "trl")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _gpu() -> dict[str, Any] | None:
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return {"name": props.name, "count": torch.cuda.device_count(), "memory_gib": round(props.total_memory / 1024**3, 1)}
    except Exception:  # noqa: BLE001 - description only
        return None
    return None


def _java() -> str | None:
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=10)
        return (out.stderr or out.stdout).splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def describe() -> dict[str, Any]:
    """CPU model, cores, memory, GPU if any, OS, Python and library versions, and the time."""
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _mem_gib(),
        "gpu": _gpu(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "java": _java(),
        "versions": versions,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
