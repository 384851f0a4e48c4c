"""Training throughput of the jitted LoRA train step, side by side with PyTorch + transformers + peft.

One random Llama per size is saved once as an HF checkpoint (safetensors) and loaded by both
sides: `jaxlora.load_model` + `make_train_step` (scan over the micro-batches, chunked loss, AdamW
on the LoRA params), and `transformers` + `peft` (same LoRA targets, rank, alpha, no dropout) +
`torch.optim.AdamW` (gradient accumulation by `backward()` per micro-batch). Same batch of random
tokens, same precision. Runs alternate (JAX, torch, JAX, torch, ...) so both see the same machine
load; the table gives medians after one warm-up step, and the JAX compile time separately.

MFU = model FLOPs per step (`jaxlora.training.metrics.model_flops_per_token`: frozen matmuls
forward + input gradient, LoRA forward + both gradients, attention) / step time / the peak:
on CPU, the best matmul FLOP/s of the row's precision measured in the same run (jax, operands in
the compute dtype accumulated in fp32, n = 2048 and 4096, before and after the runs). The table
says how much CPU other processes used during the timed steps: figures from a busy machine are not
valid (torch's OpenMP threads suffer far more from contention than XLA's).

`--quantize FMT ...` (e.g. nf4 int8) times jaxlora's QLoRA step against its LoRA step instead of
PyTorch's: the same checkpoint loaded once per format with `load_model(..., quantize=FMT)` (block
kernels quantized as read; embedding, norms and head in the precision's dtype), the same LoRA,
batch and optimizer, steps alternating (LoRA, FMT, ...); the table gives each median and the
ratio QLoRA / LoRA (no MFU: dequantising costs work the FLOP count leaves out).

    python benchmarks/throughput.py [--sizes 5m 100m] [--precision 32-true bf16-true] [--micro-batch 4]
        [--accum-steps 4] [--seq-length 256] [--rank 8] [--repeats 5] [--quantize FMT ...] [--write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxlora
from _results import append_section, machine
from jaxlora.models import quant
from jaxlora.training.metrics import measure_matmul_flops, model_flops_per_token
from jaxlora.training.optim import make_optimizer
from jaxlora.training.precision import POLICIES
from jaxlora.training.step import init_train_state, make_train_step

# Llama shapes (HF LlamaConfig fields): ~5M and ~100M parameters.
SIZES = {
    "5m": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4),
    "100m": dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12),
}
TARGETS = ("query", "key", "value", "projection", "mlp")  # every attention and MLP matrix
PEFT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TORCH_DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16}
BUSY = " -- BUSY MACHINE (other processes used the CPUs, last column): the figures are not valid"
TORCH_BUSY = ", and the ratio neither: torch's OpenMP threads lose far more than XLA's to contention"


def save_checkpoint(size: str, directory: Path) -> Path:
    """A random HF Llama of `size` saved (fp32 safetensors) under `directory`, once."""
    path = directory / f"llama-{size}"
    if not (path / "config.json").is_file():
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        config = LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False)
        LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


class JaxRunner:
    """jaxlora's train step on the checkpoint (block kernels in `quantize`'s format, None: float);
    `step()` runs one optimizer step and waits for it."""

    def __init__(self, path: Path, precision: str, rank: int, alpha: float, batch: np.ndarray,
                 quantize: str | None = None):
        policy = POLICIES[precision]
        lora = jaxlora.LoRAConfig(r=rank, alpha=alpha, **{t: True for t in TARGETS})
        model = jaxlora.load_model(path, dtype=policy.param_dtype, compute_dtype=policy.compute_dtype, lora=lora,
                                   quantize=quantize)
        self.config = model.config
        graphdef, lora_params, self.base = jaxlora.split_lora(model)
        self.n_lora = sum(x.size for x in jax.tree.leaves(lora_params))
        tx, _ = make_optimizer("adamw", lr=1e-4, total_steps=1000)
        self.state = init_train_state(lora_params, tx)
        self.train_step = make_train_step(graphdef, tx, accum_steps=batch.shape[0])
        self.batch = {"input_ids": jnp.asarray(batch), "labels": jnp.asarray(batch)}
        self.key = jax.random.key(0)

    def step(self) -> float:
        """One optimizer step; -> its loss."""
        self.state, metrics = self.train_step(self.state, self.base, self.batch, self.key)
        return float(metrics["loss"])

    def cache_size(self) -> int:
        return self.train_step._cache_size()  # noqa: SLF001  (compiled variants: 1 = no recompiles)


class TorchRunner:
    """transformers + peft + torch AdamW on the same checkpoint and batch."""

    def __init__(self, path: Path, precision: str, rank: int, alpha: float, batch: np.ndarray):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[precision])
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=PEFT_MODULES)
        self.model = get_peft_model(model, config)
        self.model.train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.batch = torch.from_numpy(batch.astype(np.int64))

    def step(self) -> float:
        accum = self.batch.shape[0]
        total = 0.0
        for ids in self.batch:
            loss = self.model(input_ids=ids, labels=ids).loss / accum
            loss.backward()
            total += loss.detach().item()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, of this process) so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    usage = os.times()
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK"), usage.user + usage.system


def timed(fn) -> tuple[float, float]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def matmul_ceilings() -> dict[str, float]:
    """precision -> best matmul FLOP/s of jax on this machine now (n = 2048 and 4096; operands in the
    precision's compute dtype, fp32 accumulation)."""
    return {name: max(measure_matmul_flops(POLICIES[name].compute_dtype, n=n, repeats=3) for n in (2048, 4096))
            for name in TORCH_DTYPES}


def make_runners(path: Path, precision: str, args: argparse.Namespace, batch: np.ndarray) -> dict:
    """name -> runner, in the order their steps alternate: "jax" (jaxlora's LoRA step), then "torch"
    (PyTorch + peft) or, with `--quantize`, one QLoRA step per format, named by it."""
    def jax_runner(quantize=None):
        return JaxRunner(path, precision, args.rank, 2.0 * args.rank, batch, quantize=quantize)

    if args.quantize:
        return {"jax": jax_runner(), **{fmt: jax_runner(fmt) for fmt in args.quantize}}
    return {"jax": jax_runner(), "torch": TorchRunner(path, precision, args.rank, 2.0 * args.rank, batch)}


def run_size(size: str, precision: str, args: argparse.Namespace, directory: Path) -> dict:
    """Time each runner of `make_runners` on one batch: one warm-up step each, then `args.repeats` rounds."""
    path = save_checkpoint(size, directory)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, SIZES[size]["vocab_size"], (args.accum_steps, args.micro_batch, args.seq_length),
                         dtype=np.int32)
    runners = make_runners(path, precision, args, batch)
    first = {name: timed(runner.step) for name, runner in runners.items()}  # (compile +) one step, its loss
    times = {name: [] for name in runners}
    t0, (machine0, own0) = time.perf_counter(), cpu_seconds()
    for _ in range(args.repeats):
        for name, runner in runners.items():
            time.sleep(0.2)  # let the previous runner's worker threads go idle
            times[name].append(timed(runner.step)[0])
    wall, (machine1, own1) = time.perf_counter() - t0, cpu_seconds()
    others = max(0.0, (machine1 - machine0) - (own1 - own0)) / (wall * os.cpu_count())
    jx, tokens = runners["jax"], batch.size
    median = {name: statistics.median(t) for name, t in times.items()}
    compiled = {name: r for name, r in runners.items() if isinstance(r, JaxRunner)}
    return dict(size=size, precision=precision, params=sum(x.size for x in jax.tree.leaves(jx.base)),
                n_lora=jx.n_lora, tokens=tokens, flops=model_flops_per_token(jx.config, jx.n_lora, args.seq_length)
                * tokens, median=median, times=times, loss={name: loss for name, (_, loss) in first.items()},
                compile_s={name: first[name][0] - median[name] for name in compiled},
                recompiles=max(r.cache_size() - 1 for r in compiled.values()), others=others)


def table(rows: list[dict], peaks: dict[str, float]) -> list[str]:
    lines = ["| size | precision | params | LoRA params | tokens/step | JAX s/step | torch s/step | JAX tok/s | "
             "torch tok/s | JAX / torch | JAX MFU | torch MFU | JAX compile s | loss step 0 (JAX / torch) | "
             "CPU used by others |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        jax_s, torch_s = r["median"]["jax"], r["median"]["torch"]
        lines.append(f"| {r['size']} | {r['precision']} | {r['params'] / 1e6:.1f}M | {r['n_lora'] / 1e6:.2f}M | "
                     f"{r['tokens']} | {jax_s:.3f} | {torch_s:.3f} | {r['tokens'] / jax_s:,.0f} | "
                     f"{r['tokens'] / torch_s:,.0f} | {torch_s / jax_s:.2f}x | "
                     f"{r['flops'] / jax_s / peaks[r['precision']]:.0%} | "
                     f"{r['flops'] / torch_s / peaks[r['precision']]:.0%} | "
                     f"{r['compile_s']['jax']:.1f} | {r['loss']['jax']:.4f} / {r['loss']['torch']:.4f} | "
                     f"{r['others']:.0%} |")
    return lines


def quant_table(rows: list[dict], formats: list[str]) -> list[str]:
    """One line per size and precision: the LoRA step's median, each QLoRA format's and its ratio to LoRA."""
    names, labels = ["jax", *formats], " / ".join(["LoRA", *formats])
    per_format = "".join(f" {fmt} s/step | {fmt} / LoRA |" for fmt in formats)
    lines = [f"| size | precision | params | LoRA params | tokens/step | LoRA s/step |{per_format} compile s "
             f"({labels}) | loss step 0 ({labels}) | CPU used by others |",
             "|---|---|---:|---:|---:|---:|" + "---:|---:|" * len(formats) + "---|---|---:|"]
    for r in rows:
        lora_s = r["median"]["jax"]
        compile_s = " / ".join(f"{r['compile_s'][n]:.1f}" for n in names)
        losses = " / ".join(f"{r['loss'][n]:.4f}" for n in names)
        lines.append(f"| {r['size']} | {r['precision']} | {r['params'] / 1e6:.1f}M | {r['n_lora'] / 1e6:.2f}M | "
                     f"{r['tokens']} | {lora_s:.3f} |" +
                     "".join(f" {r['median'][fmt]:.3f} | {r['median'][fmt] / lora_s:.2f}x |" for fmt in formats) +
                     f" {compile_s} | {losses} | {r['others']:.0%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--precision", nargs="+", default=list(TORCH_DTYPES), choices=list(TORCH_DTYPES))
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accum-steps", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per side (alternating)")
    parser.add_argument("--quantize", nargs="+", metavar="FMT",
                        help="time jaxlora's QLoRA step in each format (e.g. nf4 int8) against its LoRA step, "
                        f"instead of PyTorch + peft; formats: {', '.join(sorted(quant.QUANTIZE))}")
    parser.add_argument("--checkpoints", type=Path, default=Path(tempfile.gettempdir()) / "jaxlora-bench",
                        help="where the random HF checkpoints are saved (once)")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    for fmt in args.quantize or ():
        quant.resolve(fmt)  # fails early, listing the known formats

    load_start = os.getloadavg()
    peaks = None if args.quantize else matmul_ceilings()
    rows = []
    for size in args.sizes:
        for precision in args.precision:
            rows.append(run_size(size, precision, args, args.checkpoints))
            r = rows[-1]
            print(f"{size} {precision}: " + " ".join(f"{name} {['%.3f' % t for t in times]}"
                                                      for name, times in r["times"].items()) +
                  f" recompiles {r['recompiles']}", flush=True)
    load_end = os.getloadavg()
    busy = max(r["others"] for r in rows) > 0.05
    setting = (f"`python benchmarks/throughput.py {' '.join(os.sys.argv[1:])}`: micro-batch {args.micro_batch} x "
               f"seq {args.seq_length} x {args.accum_steps} accumulation steps, LoRA r={args.rank} "
               f"alpha={2 * args.rank} on {', '.join(TARGETS)}, AdamW; median of {args.repeats} alternating steps "
               "after one warm-up.")
    load = f"Load average (1 min) {load_start[0]:.2f} at start, {load_end[0]:.2f} at end"
    if args.quantize:
        text = "\n".join([
            f"{setting} QLoRA: the same checkpoint loaded with `load_model(..., quantize=FMT)` for "
            f"{', '.join(args.quantize)} (block kernels quantized, embedding, norms and head in the precision's "
            f"dtype). {load}{BUSY if busy else ''}. {machine()}.", "", *quant_table(rows, args.quantize)])
        title = "Throughput: QLoRA vs LoRA"
    else:
        peaks = {k: max(v, w) for (k, v), w in zip(peaks.items(), matmul_ceilings().values())}
        text = "\n".join([
            f"{setting} MFU against the matmul ceiling of each precision measured in this run (jax, best of "
            f"n = 2048 and 4096 before and after the runs, fp32 accumulation): "
            f"{', '.join(f'{k} {v / 1e9:.0f} GFLOP/s' for k, v in peaks.items())}. {load}"
            f"{BUSY + TORCH_BUSY if busy else ''}. "
            f"{machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
            f"{__import__('transformers').__version__}, peft {__import__('peft').__version__}.",
            "", *table(rows, peaks)])
        title = "Throughput vs PyTorch + PEFT"
    print("\n" + text)
    if args.write:
        append_section(title, text)


if __name__ == "__main__":
    main()
