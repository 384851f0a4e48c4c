"""What every benchmark records beside its table: the machine and versions, and its RESULTS.md section."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import jax

RESULTS = Path(__file__).with_name("RESULTS.md")


def cpu_model() -> str:
    """The CPU's model name and its 16-bit matmul units, from /proc/cpuinfo (Linux): bf16 speed on CPU
    depends on them (e.g. 'Intel(R) Xeon(R) Processor @ 2.60GHz, no AMX / AVX512-BF16')."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    name = fields.get("model name\t", "unknown CPU").strip()
    flags = set(fields.get("flags\t\t", "").split())
    units = [u for u, flag in (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16")) if flag in flags]
    return f"{name}, {' + '.join(units) if units else 'no AMX / AVX512-BF16'}"


def machine() -> str:
    """e.g. 'x86_64 2 cores (Intel(R) Xeon(R) ..., AMX + AVX512-BF16), cpu; jax 0.10.2, flax 0.12.8; 2026-11-29'."""
    return (f"{platform.machine()} {os.cpu_count()} cores ({cpu_model()}), {jax.default_backend()}; "
            f"jax {jax.__version__}, flax {__import__('flax').__version__}; {datetime.date.today()}")


def append_section(title: str, body: str) -> None:
    """Append '## title (date)' and body to benchmarks/RESULTS.md."""
    with open(RESULTS, "a") as f:
        f.write(f"\n## {title} ({datetime.date.today()})\n\n{body.strip()}\n")
