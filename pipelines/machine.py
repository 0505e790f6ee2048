"""What this CPU and its numeric libraries are: the key under which speed figures are kept and shown.

A speed figure holds for one CPU, one set of library versions and one thread count, never
for "the project": the same network ran ONNX Runtime ahead of torch on an AMD EPYC and level
with it on an Intel Xeon (issue 21). So a measured backend choice is keyed by this record,
and every benchmark figure is written next to it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

# CPU features that change which kernels the libraries pick (vector width, bfloat16 and int8 dot
# products, AMX tiles); the rest of /proc/cpuinfo's flags do not move a forward's speed.
FLAGS_THAT_MATTER = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "avx_vnni",
    "asimd",
    "sve",
)


class Machine(BaseModel):
    """A CPU as speed figures depend on it: its model, the flags that matter, the libraries and threads."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cpu: str
    flags: tuple[str, ...]
    torch: str | None
    onnxruntime: str | None
    threads: int

    def key(self) -> str:
        """A short stable name for this record (file names)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def describe(self) -> str:
        return (
            f"{self.cpu} [{' '.join(self.flags) or 'no listed flags'}], torch {self.torch}, "
            f"onnxruntime {self.onnxruntime}, {self.threads} threads"
        )


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> tuple[str, tuple[str, ...]]:
    """(model name, the flags that matter) from /proc/cpuinfo; elsewhere the platform's processor name."""
    try:
        text = path.read_text()
    except OSError:
        return platform.processor() or platform.machine(), ()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip(), value.strip())  # the first processor speaks for all
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    cpu = fields.get("model name") or fields.get("Hardware") or platform.processor() or platform.machine()
    return cpu, tuple(f for f in FLAGS_THAT_MATTER if f in flags)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def this_machine(threads: int | None = None) -> Machine:
    """This CPU with the installed torch and onnxruntime, at `threads` (default: torch's current count)."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    cpu, flags = cpu_info()
    return Machine(cpu=cpu, flags=flags, torch=_version("torch"), onnxruntime=_version("onnxruntime"), threads=threads)


def bench_description() -> dict[str, Any]:
    """What a benchmark writes next to its figures: the machine, the cores and the load at the time."""
    m = this_machine()
    return {
        **m.model_dump(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
