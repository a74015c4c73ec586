"""sweep.json says which machine made a run: what its rounding depends on besides config and seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_hessian.sweep.machine import describe_machine

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor @ 2.80GHz
flags\t\t: fpu sse sse2 sse4_2 avx avx2 avx512f avx512bw

processor\t: 1
model name\t: Intel(R) Xeon(R) Processor @ 2.80GHz
flags\t\t: fpu sse sse2 sse4_2 avx avx2 avx512f avx512bw
"""
AVX2_CPUINFO = "model name\t: AMD EPYC 7B12\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
ARM_CPUINFO = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes crc32\nCPU part\t: 0xd0c\n"


@pytest.mark.parametrize(
    ("cpuinfo", "cpu", "vector"),
    [
        (X86_CPUINFO, "Intel(R) Xeon(R) Processor @ 2.80GHz", "avx512f"),
        (AVX2_CPUINFO, "AMD EPYC 7B12", "avx2"),
        (ARM_CPUINFO, None, "asimd"),
    ],
    ids=["avx512", "avx2", "arm"],
)
def test_the_cpu_and_its_widest_vector_extension(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpuinfo: str, cpu: str | None, vector: str
) -> None:
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    monkeypatch.setattr("platform.processor", lambda: "")
    machine = describe_machine(cpuinfo=tmp_path / "cpuinfo", nvidia_driver=tmp_path / "no-driver")
    assert machine["cpu"] == cpu and machine["cpu_vector"] == vector
    assert machine["gpus"] == []


def test_gpus_threads_and_kernel_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for index, model in enumerate(["NVIDIA H200", "NVIDIA H200"]):
        gpu = tmp_path / "nvidia" / "gpus" / f"0000:0{index}:00.0"
        gpu.mkdir(parents=True)
        (gpu / "information").write_text(f"Model: \t\t {model}\nIRQ:   \t\t 42\nBus Type: \t PCIe\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    machine = describe_machine(cpuinfo=tmp_path / "missing", nvidia_driver=tmp_path / "nvidia")
    assert machine["gpus"] == ["NVIDIA H200", "NVIDIA H200"]
    assert machine["environment"]["OMP_NUM_THREADS"] == "1"
    assert machine["environment"]["ATEN_CPU_CAPABILITY"] == "avx2"
    assert "MKL_NUM_THREADS" not in machine["environment"]
    assert machine["cpu_vector"] is None  # no /proc/cpuinfo (not Linux): unknown, not guessed


def test_this_machine_has_the_torch_that_runs_here() -> None:
    import torch

    machine = describe_machine()
    assert machine["torch"] is not None and torch.__version__.startswith(machine["torch"])
    assert machine["cpu_count"] and machine["host"]
