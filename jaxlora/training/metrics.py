"""Run metrics: the CSV/TensorBoard writer, model FLOPs per token, device peak FLOP/s, peak memory.

FLOPs counted per trained token (a multiply-add is 2 FLOPs; `model_flops_per_token`):
  frozen matmuls   4 * N_frozen   forward 2N + backward input-gradient 2N (no weight gradient)
  LoRA matmuls     6 * N_lora     forward 2N + input-gradient 2N + weight-gradient 2N
  attention        12 * sum over layers of (n_head * head_size * T_l)
                   (QK^T and AV, 2 matmuls of 2 FLOPs x head dims x context each, times 3 for the
                   backward), T_l = seq_len, or the sliding window when smaller (PaLM's count:
                   the causal mask is not halved).
N_frozen counts the kernels every token multiplies by: q, k, v, output projection, MLP (for an
MoE: the router and `n_expert_per_token` experts), and the LM head over the padded vocab
(the tied embedding when tied). Not counted: the embedding gather, norms, RoPE, softmax,
biases, elementwise ops, and rematerialisation (recomputation is hardware FLOPs, not model FLOPs).
MFU = FLOPs per token x trained tokens/s / peak FLOP/s of all the devices used.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxlora import storage
from jaxlora.models.config import ModelConfig

log = logging.getLogger(__name__)

CSV_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "val_loss", "val_ppl", "val_exact_match", "tokens",
               "step_time", "tokens_per_s", "elapsed", "router_aux_loss")

# Dense (non-sparse) bf16 peak FLOP/s per chip from the vendors' datasheets. Matched in order
# against the lower-cased `device_kind`, so more specific names come first.
PEAK_BF16_FLOPS = (
    ("gh200", 989.4e12), ("h200", 989.4e12), ("h100 pcie", 756.0e12), ("h100 nvl", 835.0e12),
    ("h100", 989.4e12), ("b200", 2250e12), ("a100", 312e12), ("l40s", 362.1e12), ("l40", 181.0e12),
    ("l4", 121.0e12), ("rtx 4090", 165.2e12), ("rtx 3090", 71.0e12),
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5p", 459e12), ("tpu v5", 459e12), ("tpu v4", 275e12), ("tpu v3", 123e12), ("tpu v2", 45e12),
)


def frozen_matmul_params(config: ModelConfig) -> int:
    """Frozen kernel entries a token is multiplied by (see the module docstring)."""
    c = config
    q, kv = c.n_head * c.head_size, c.n_query_groups * c.head_size
    attention = c.n_embd * q + 2 * c.n_embd * kv + q * c.n_embd
    if c.mlp_class == "GptNeoxMLP":
        mlp = 2 * c.n_embd * c.intermediate_size
    elif c.mlp_class == "LLaMAMoE":
        mlp = c.n_expert_per_token * 3 * c.n_embd * c.intermediate_size + c.n_embd * c.n_expert
    else:
        mlp = 3 * c.n_embd * c.intermediate_size
    return c.n_layer * (attention + mlp) + c.n_embd * c.padded_vocab_size


def model_flops_per_token(config: ModelConfig, n_lora: int, seq_len: int) -> float:
    """Training FLOPs per token of a LoRA step at sequence length `seq_len` (module docstring)."""
    c = config
    context = sum(min(seq_len, c.sliding_window_for_layer(i) or seq_len) for i in range(c.n_layer))
    attention = 12 * c.n_head * c.head_size * context
    return float(4 * frozen_matmul_params(c) + 6 * n_lora + attention)


def device_peak_flops(devices=None, *, dtype=jnp.bfloat16, measure_cpu: bool = True) -> float | None:
    """Peak FLOP/s of `devices` together (default: all): the datasheet bf16 peak per GPU/TPU chip,
    or on CPU a one-off ~1 s measurement of a large `dtype` matmul (all CPU devices share the host's
    cores, so it is not multiplied by the device count). None when unknown or not measured.
    """
    devices = jax.devices() if devices is None else devices
    device = devices[0]
    if device.platform == "cpu":
        return measure_matmul_flops(dtype) if measure_cpu else None
    kind = device.device_kind.lower()
    for name, flops in PEAK_BF16_FLOPS:
        if name in kind:
            return flops * len(devices)
    log.info("no peak FLOP/s known for %r: MFU is not reported", device.device_kind)
    return None


def measure_matmul_flops(dtype=jnp.float32, n: int = 2048, repeats: int = 3) -> float:
    """Best-of-`repeats` FLOP/s of an n x n x n `dtype` matmul accumulated in fp32 (as the model's
    `matmul` does; on CPU, XLA runs bf16 dots with bf16 outputs on a far slower path) on the default device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def compiled_memory_bytes(compiled) -> int:
    """Bytes a compiled computation (`jit(f).lower(...).compile()`) needs on its device: arguments +
    temporaries + outputs not aliased to donated arguments. (`peak_memory_in_bytes` on CPU is only
    the argument size.) Within 1.3% of a real run's peak RSS on CPU (benchmarks/RESULTS.md)."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def peak_memory() -> tuple[int | None, str]:
    """(bytes, source): the device allocator's peak (the largest over local devices) where it reports
    one, else this process's peak resident set size."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    if peaks and all(p is not None for p in peaks):
        return int(max(peaks)), "device peak_bytes_in_use"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"


class MetricsWriter:
    """`<out_dir>/metrics.csv` (one row per logged or evaluated step) and/or TensorBoard scalars.

    On resume (`start_step` > 0) the CSV keeps its rows up to `start_step` and drops later ones,
    which belonged to the interrupted run. Only process 0 writes.

    A URL out_dir (gs://...): objects cannot be appended to, so the CSV and the TensorBoard files are
    written in a local staging directory and each is uploaded whole (replacing the object, which a
    reader sees atomically) by `sync()` - which `fit` calls before each checkpoint save, so the CSV
    on the bucket holds every row up to a saved step - at most every `upload_interval` seconds as
    rows are written, and at `close()`.
    """

    upload_interval = 30.0

    def __init__(self, out_dir: str | os.PathLike, *, csv_file: bool = True, tensorboard: bool = False,
                 start_step: int = 0):
        self.remote = storage.is_url(out_dir)
        self.out_dir = storage.path(out_dir)
        self.path = self.out_dir / "metrics.csv"
        self._file = self._csv = self._tb = self._staging = None
        self._last_upload = time.monotonic()
        if jax.process_index() != 0:
            return
        if self.remote:
            self._staging = storage.local_dir("jaxlora-metrics-")
            local_out = self._staging
        else:
            local_out = Path(out_dir)
            local_out.mkdir(parents=True, exist_ok=True)
        local_csv = local_out / "metrics.csv"
        if csv_file:
            kept = []
            if start_step > 0 and self.path.is_file():
                if self.remote:
                    storage.download(self.path, local_csv)
                with open(local_csv, newline="") as f:
                    kept = [row for row in csv.DictReader(f) if row.get("step") and int(row["step"]) <= start_step]
            self._file = open(local_csv, "w", newline="")
            self._csv = csv.DictWriter(self._file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            self._csv.writeheader()
            self._csv.writerows(kept)
            self._file.flush()
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(local_out / "tensorboard"))

    def write(self, row: dict) -> None:
        if self._csv is not None:
            self._csv.writerow({k: ("" if v is None else v) for k, v in row.items()})
            self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and value is not None:
                    self._tb.add_scalar(f"val/{key}" if key.startswith("val") else f"train/{key}", value, row["step"])
        if self.remote and time.monotonic() - self._last_upload >= self.upload_interval:
            self.sync()

    def sync(self) -> None:
        """Upload the staged files to a URL out_dir (nothing to do for a local one)."""
        if self._staging is None:
            return
        if self._file is not None:
            self._file.flush()
            storage.upload(self._staging / "metrics.csv", self.path)
        if self._tb is not None:
            self._tb.flush()
            storage.upload_dir(self._staging / "tensorboard", self.out_dir / "tensorboard")
        self._last_upload = time.monotonic()

    def close(self) -> None:
        try:
            self.sync()
        finally:
            if self._file is not None:
                self._file.close()
            if self._tb is not None:
                self._tb.close()
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
