"""What a run's numbers depend on beyond its config and seed: the machine that trained it.

Runs with the same config and seeds are bit-identical only with the same CPU instructions, thread
count and torch build (README, Quickstart): on a CPU, AVX2 kernels round otherwise than AVX-512
ones, and another thread count splits the sums otherwise. ``sweep.json`` keeps this description
for each run (``machine``) and for each earlier attempt of a resumed run, so that a study
continued on another machine says which runs were made where.

The description comes from the operating system, not from torch or CUDA (the sweep starts no
CUDA context): the CPU from ``/proc/cpuinfo``, NVIDIA GPUs from ``/proc/driver/nvidia``, torch's
version from its package metadata, and the environment variables that change kernels or threads.
"""

from __future__ import annotations

import os
import platform
import socket
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["KERNEL_ENVIRONMENT", "describe_machine"]

#: environment variables that change which kernels run or how many threads split a sum
KERNEL_ENVIRONMENT = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "CUBLAS_WORKSPACE_CONFIG",
    "CUDA_VISIBLE_DEVICES",
)
# widest vector extension first: the one torch's CPU kernels use unless ATEN_CPU_CAPABILITY says less
_VECTOR_EXTENSIONS = ("avx512f", "avx2", "avx", "sse4_2", "asimd", "neon")


def _cpuinfo_fields(text: str) -> tuple[str | None, str | None]:
    """The model name and the widest vector extension in a ``/proc/cpuinfo`` text."""
    model = flags = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if model is None and key in ("model name", "cpu model", "hardware"):
            model = value.strip() or None
        elif flags is None and key in ("flags", "features"):
            flags = set(value.split())
    vector = next((name for name in _VECTOR_EXTENSIONS if flags and name in flags), None)
    return model, vector


def _nvidia_gpus(driver: Path) -> list[str]:
    models = []
    for information in sorted(driver.glob("gpus/*/information")):
        for line in information.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model":
                models.append(value.strip())
    return models


def describe_machine(
    cpuinfo: Path = Path("/proc/cpuinfo"), nvidia_driver: Path = Path("/proc/driver/nvidia")
) -> dict[str, Any]:
    """The machine this process runs on, as far as a run's rounding depends on it.

    Returns:
        ``host``, ``cpu`` (model name), ``cpu_vector`` (widest vector extension, e.g. ``avx512f``),
        ``cpu_count``, ``gpus`` (NVIDIA models; empty without the driver), ``torch`` (version, or
        ``None`` when not installed) and ``environment`` (the :data:`KERNEL_ENVIRONMENT` variables
        that are set). A field that cannot be read is ``None``.
    """
    try:
        model, vector = _cpuinfo_fields(cpuinfo.read_text(errors="replace"))
    except OSError:  # not Linux
        model, vector = None, None
    try:
        gpus = _nvidia_gpus(nvidia_driver)
    except OSError:
        gpus = []
    try:
        torch_version: str | None = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {
        "host": socket.gethostname(),
        "cpu": model or platform.processor() or None,
        "cpu_vector": vector,
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
        "torch": torch_version,
        "environment": {name: os.environ[name] for name in KERNEL_ENVIRONMENT if name in os.environ},
    }
