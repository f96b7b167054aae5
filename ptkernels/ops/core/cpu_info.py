"""What the CPU GEMM rules key on: the CPU's vendor, family, model and instruction-set flags (Linux /proc/cpuinfo;
``platform`` elsewhere). Read once per process."""

from __future__ import annotations

import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class CPUInfo:
    vendor: str  # "GenuineIntel", "AuthenticAMD", ... or "" when unknown
    model: str
    flags: frozenset
    family: int = -1  # /proc/cpuinfo's "cpu family" (AMD: 25 = Zen 3 / Zen 4, 26 = Zen 5); -1 when unknown

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags


def parse_cpuinfo(text: str) -> CPUInfo:
    """The first processor's vendor_id, model name and flags from the text of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    family = fields.get("cpu family", "")
    return CPUInfo(vendor=fields.get("vendor_id", ""), model=fields.get("model name", ""),
                   flags=frozenset(fields.get("flags", "").split()), family=int(family) if family.isdigit() else -1)


_CACHE: dict[str, CPUInfo] = {}


def cpu_info() -> CPUInfo:
    if "cpu" not in _CACHE:
        try:
            with open("/proc/cpuinfo") as f:
                info = parse_cpuinfo(f.read())
        except OSError:
            info = CPUInfo(vendor="", model=platform.processor(), flags=frozenset())
        _CACHE["cpu"] = info
    return _CACHE["cpu"]
