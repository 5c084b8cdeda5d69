"""One line that says which CPU a benchmark's figures come from.

int8 LiteRT speed-ups differ ~2x between CPUs with and without AVX-512 VNNI, and bf16 kernels
exist only with AVX-512 BF16 / AMX, so every benchmark prints this line before its figures.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The flags of :data:`FLAGS` that the first CPU in /proc/cpuinfo has, in that order."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            have = set(line.partition(":")[2].split())
            return tuple(f for f in FLAGS if f in have)
    return ()


def cpu_model(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown CPU"


def describe_machine() -> str:
    """e.g. 'machine: AMD EPYC 9R14, 2 cores, flags avx2 fma avx512f avx512_vnni avx512_bf16'."""
    flags = " ".join(cpu_flags()) or "none of " + " ".join(FLAGS)
    return f"machine: {cpu_model()}, {os.cpu_count()} cores, flags {flags}"
