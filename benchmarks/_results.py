"""What every benchmark records beside its table: the machine and versions, and its RESULTS.md section."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import jax

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    """e.g. 'x86_64 2 cores, cpu; jax 0.10.2, flax 0.12.8; 2026-11-29'."""
    return (f"{platform.machine()} {os.cpu_count()} cores, {jax.default_backend()}; jax {jax.__version__}, "
            f"flax {__import__('flax').__version__}; {datetime.date.today()}")


def append_section(title: str, body: str) -> None:
    """Append '## title (date)' and body to benchmarks/RESULTS.md."""
    with open(RESULTS, "a") as f:
        f.write(f"\n## {title} ({datetime.date.today()})\n\n{body.strip()}\n")
