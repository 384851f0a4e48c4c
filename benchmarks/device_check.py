"""What to measure on a lent GPU (H100 / H200), in phases that each fit a few minutes; run by device_check.sh.

  attention  the attention implementation jaxlora picks for the Llama-3.2-1B preset in bf16
             (`models.gpt.attention_implementation("auto", config, jnp.bfloat16)`), backend, devices, versions
  step       a random Llama-3.2-1B (`ModelConfig.from_name("Llama-3.2-1B")`, built with `GPT(...)`, no
             checkpoint) under bf16-true, seq 2048, micro-batch 1, one micro-batch per step, LoRA r 16
             alpha 16 on query and value, AdamW; once with float frozen weights (LoRA) and once with
             quantize="bnb.nf4" (QLoRA; the kernels are zeros, the work is the same). Each in a fresh
             process: first step (compile included), median of 5 steps after 2 warm-up steps, tokens/s,
             MFU = `metrics.model_flops_per_token` x tokens/s / peak (989e12 for H100 SXM and H200, bf16
             dense datasheet figures; other devices: `metrics.device_peak_flops`; CPU: a bf16 matmul
             measured here), and the device's peak_bytes_in_use
  memory     the llama-3.2-1B recipe's step (micro-batch 1, seq 512, LoRA on query and value, bf16-true;
             2 micro-batches per step: the peak is one micro-batch's) at ranks 8, 64 and 256: predicted
             bytes = `compiled_memory_bytes` of the step `memory_vs_rank.abstract_step` builds (what
             `memory_vs_rank.measure` reports as total on a GPU), against the real peak
             (`jax.devices()[0].memory_stats()["peak_bytes_in_use"]`) of 2 steps run in a fresh process
             per rank (processes run side by side: each has its own allocator and peak). The peak after
             compiling (autotuning scratch) is recorded too, so a peak set by compilation shows. On CPU
             the peak is peak RSS - RSS after compiling, as `memory_vs_rank --verify` measures it.
  report     device_check.json -> device_check.md (one table per phase)

Each phase merges its results into <out>/device_check.json (out: --out, else $OUT, else
benchmarks/results). `--smoke` runs every phase on a tiny Llama-shaped model with short sequences,
on whatever backend there is (a CPU check that the script works; under 2 minutes on 2 cores).
XLA_PYTHON_CLIENT_PREALLOCATE defaults to false here so that processes can share a GPU.

    python benchmarks/device_check.py [--phase attention|step|memory|report|all] [--smoke] [--out DIR]
        [--rank 16] [--seq-length 2048] [--ranks 8 64 256]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jaxlora  # noqa: E402
from _results import machine  # noqa: E402
from jaxlora.models import quant  # noqa: E402
from jaxlora.models.config import ModelConfig  # noqa: E402
from jaxlora.models.gpt import GPT, attention_implementation  # noqa: E402
from jaxlora.models.lora import LoRAConfig, split_lora  # noqa: E402
from jaxlora.training import metrics  # noqa: E402
from jaxlora.training.optim import make_optimizer  # noqa: E402
from jaxlora.training.precision import POLICIES  # noqa: E402
from jaxlora.training.step import init_train_state, make_train_step  # noqa: E402

PRESET = "Llama-3.2-1B"
SMOKE = "device-check-smoke"  # a tiny Llama registered as a preset (memory_vs_rank builds models by name)
PRECISION = "bf16-true"
QUANTIZE = "bnb.nf4"
GB = 1e9
# bf16 dense peak FLOP/s named in the output (datasheets); matched in order against the device kind
PEAKS = (("h200", 989e12, "H200 bf16 dense, datasheet"),
         ("h100 pcie", None, None), ("h100 nvl", None, None),  # not SXM: metrics.PEAK_BF16_FLOPS's figure
         ("h100", 989e12, "H100 SXM bf16 dense, datasheet"))
MEMORY_SEQ, MEMORY_ACCUM = 512, 2


def out_dir(args) -> Path:
    path = Path(args.out or os.environ.get("OUT") or Path(__file__).with_name("results"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def merge(args, key: str, value) -> None:
    """Put `value` under `key` in <out>/device_check.json (other phases' keys kept)."""
    path = out_dir(args) / "device_check.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def load_memory_vs_rank(smoke: bool):
    """benchmarks/memory_vs_rank.py, imported where needed (it needs ml_collections, through jaxlora.config, which
    the other phases do not). Its import adds a CPU scheduler flag to XLA_FLAGS: kept for --smoke (CPU), dropped
    otherwise (of no use off CPU, and fatal if this XLA does not know it); jax reads XLA_FLAGS later, at its first
    computation."""
    import memory_vs_rank
    if not smoke:
        os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                           if not f.startswith("--xla_cpu_scheduler_type"))
    return memory_vs_rank


def nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def model_config(smoke: bool) -> ModelConfig:
    config = ModelConfig.from_name(PRESET)
    if not smoke:
        return config
    tiny = config.replace(name=SMOKE, n_layer=2, n_embd=128, n_head=4, n_query_groups=2, head_size=32,
                          intermediate_size=256, vocab_size=1024, padded_vocab_size=1024)
    jaxlora.PRESETS.setdefault(SMOKE, tiny)
    return tiny


def device_info() -> dict:
    d = jax.devices()[0]
    versions = {name: getattr(__import__(name), "__version__", "?") for name in ("jax", "jaxlib", "flax", "optax")}
    return dict(backend=jax.default_backend(), device_kind=d.device_kind, device_count=jax.device_count(),
                versions=versions, machine=machine())


def peak_flops(smoke: bool) -> tuple[float | None, str]:
    """(bf16 peak FLOP/s of the device, where the figure comes from)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        n = 1024 if smoke else 2048
        return metrics.measure_matmul_flops(jnp.bfloat16, n=n), f"CPU bf16 matmul measured here (n={n})"
    kind = device.device_kind.lower()
    for name, flops, source in PEAKS:
        if name in kind and flops:
            return flops, f"{source} ({device.device_kind})"
        if name in kind:
            break
    flops = metrics.device_peak_flops(dtype=jnp.bfloat16)
    return flops, f"jaxlora.training.metrics.PEAK_BF16_FLOPS ({device.device_kind})" if flops else "unknown"


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# ---------------------------------------------------------------------------------------------
# Children: one measurement per process (a fresh allocator peak)


def step_child(args) -> dict:
    """Step time, MFU and peak memory of one variant ("lora" or "qlora")."""
    config = model_config(args.smoke)
    policy = POLICIES[PRECISION]
    quantize = quant.resolve(QUANTIZE) if args.variant == "qlora" else None
    lora = LoRAConfig(r=args.rank, alpha=16, query=True, value=True)
    t0 = time.perf_counter()
    model = GPT(config, lora, param_dtype=policy.param_dtype, compute_dtype=policy.compute_dtype, quantize=quantize,
                rngs=nnx.Rngs(0))
    graphdef, lora_params, base = split_lora(model)
    del model
    jax.block_until_ready(base)
    build_s = time.perf_counter() - t0
    n_lora = sum(x.size for x in jax.tree.leaves(lora_params))
    tx, _ = make_optimizer("adamw", lr=2e-4, total_steps=1000)
    state = init_train_state(lora_params, tx)
    train_step = make_train_step(graphdef, tx, accum_steps=1)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.micro_batch, args.seq_length), np.int32)
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids)}
    key = jax.random.key(0)

    def step():
        nonlocal state
        t = time.perf_counter()
        state, m = train_step(state, base, batch, key)
        loss = float(m["loss"])  # waits for the step
        return time.perf_counter() - t, loss

    first_s, loss0 = step()
    for _ in range(args.warmup - 1):
        step()
    times, losses = zip(*[step() for _ in range(args.steps)])
    median = statistics.median(times)
    tokens = args.micro_batch * args.seq_length
    flops = metrics.model_flops_per_token(config, n_lora, args.seq_length) * tokens
    peak, peak_source = peak_flops(args.smoke)
    mem = device_peak_bytes()
    return dict(variant=args.variant, quantize=QUANTIZE if quantize else None, model=config.name,
                frozen_bytes=nbytes(base), n_lora=n_lora, rank=args.rank,
                seq_length=args.seq_length, micro_batch=args.micro_batch, tokens_per_step=tokens,
                attention_impl=attention_implementation("auto", config, policy.compute_dtype),
                build_s=build_s, first_step_s=first_s, times=list(times), median_s=median,
                tokens_per_s=tokens / median, flops_per_step=flops, peak_flops=peak, peak_source=peak_source,
                mfu=flops / median / peak if peak else None, loss_first=loss0, loss_last=losses[-1],
                finite=bool(np.isfinite([loss0, *losses]).all()),
                peak_bytes=mem, peak_bytes_source="device peak_bytes_in_use" if mem is not None else None)


def memory_child(args) -> dict:
    """Predicted (abstract compile) and real peak bytes of the recipe's step at rank `args.rank`."""
    config = model_config(args.smoke)
    mvr = load_memory_vs_rank(args.smoke)
    s = mvr.Setting(name="llama-3.2-1B", model=config.name, rank=args.rank, targets=("query", "value"), alpha=16,
                    micro_batch=1, seq_length=args.seq_length, accum_steps=MEMORY_ACCUM, precision=PRECISION,
                    remat="none", mode="scan", quantize=None)
    step, abstract, _, _ = mvr.abstract_step(s, s.precision)
    t = time.perf_counter()
    compiled = step.lower(*abstract).compile()
    compile_s = time.perf_counter() - t
    predicted = metrics.compiled_memory_bytes(compiled)
    peak_after_compile = device_peak_bytes()
    on_device = peak_after_compile is not None
    if not on_device:  # CPU: as memory_vs_rank.real_run, peak RSS above the RSS after compiling
        rss_before = mvr.rss_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
    state, base, batch, key = (jax.tree.map(lambda a: jnp.full(a.shape, 0.01 if jnp.issubdtype(a.dtype, jnp.floating)
                                                                else 1, a.dtype), x)
                               if i != 3 else jax.random.key(0) for i, x in enumerate(abstract))
    t = time.perf_counter()
    for _ in range(2):
        state, m = compiled(state, base, batch, key)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t) / 2
    measured = device_peak_bytes() if on_device else mvr.rss_bytes("VmHWM") - rss_before
    return dict(rank=args.rank, n_lora=sum(x.size for x in jax.tree.leaves(abstract[0].lora)), predicted=predicted,
                measured=measured, rel_error=predicted / measured - 1 if measured else None,
                peak_after_compile=peak_after_compile, compile_s=compile_s, step_s=step_s,
                source="device peak_bytes_in_use" if on_device else "peak RSS - RSS after compiling",
                setting=f"{config.name}, micro-batch 1 x seq {args.seq_length} x {MEMORY_ACCUM}, LoRA q,v, {PRECISION}")


def child_command(args, kind: str, **extra) -> list[str]:
    cmd = [sys.executable, __file__, "--child", kind, "--out", str(out_dir(args))]
    if args.smoke:
        cmd.append("--smoke")
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


def child_result(proc: subprocess.Popen, timeout: float) -> dict:
    """The JSON line a child printed last, or {"error": ...}."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s", "stderr": stderr[-2000:]}
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"error": f"exit code {proc.returncode}", "stderr": stderr[-2000:]}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# Phases


def phase_attention(args) -> None:
    config = ModelConfig.from_name(PRESET)
    result = dict(device_info(), preset=PRESET, requested="auto", compute_dtype="bfloat16",
                  chosen=attention_implementation("auto", config, jnp.bfloat16))
    print(f"attention: {result['chosen']} for {PRESET} in bf16 on {result['backend']} ({result['device_kind']})")
    merge(args, "attention", result)


def phase_step(args) -> None:
    results = {}
    for variant in ("lora", "qlora"):
        cmd = child_command(args, "step", variant=variant, rank=args.rank, seq_length=args.seq_length,
                            micro_batch=args.micro_batch, steps=args.steps, warmup=args.warmup)
        results[variant] = child_result(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                         text=True), args.child_timeout)
        r = results[variant]
        print(f"step {variant}: " + (f"first {r['first_step_s']:.2f} s, median {r['median_s'] * 1e3:.1f} ms, "
                                     f"MFU {pct(r['mfu'], '.1%')}, peak {fmt_gb(r['peak_bytes'])} GB"
                                     if "error" not in r else f"FAILED {r['error']}: {r['stderr'][-600:]}"), flush=True)
    merge(args, "step", results)


def phase_memory(args) -> None:
    procs = {rank: subprocess.Popen(child_command(args, "memory", rank=rank, seq_length=args.memory_seq_length),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in args.ranks}  # side by side: one allocator (and peak) per process
    deadline = time.monotonic() + args.child_timeout
    results = []
    for rank, proc in procs.items():
        r = child_result(proc, max(1.0, deadline - time.monotonic()))
        r.setdefault("rank", rank)
        results.append(r)
        print(f"memory r={rank}: " + (f"predicted {fmt_gb(r['predicted'])} GB, measured {fmt_gb(r['measured'])} GB "
                                      f"({pct(r['rel_error'])})" if "error" not in r
                                      else f"FAILED {r['error']}: {r['stderr'][-600:]}"), flush=True)
    merge(args, "memory", results)


def fmt_gb(x) -> str:
    return "-" if x is None else f"{x / GB:.3f}"


def pct(x, spec: str = "+.1%") -> str:
    return "-" if x is None else format(x, spec)


def phase_report(args) -> None:
    path = out_dir(args) / "device_check.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if args.pytest_rc is not None or args.install:
        data["shell"] = {"pytest_rc": args.pytest_rc, "install": args.install}
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    lines = ["# Device check", ""]
    a = data.get("attention")
    if a:
        lines += [f"Backend {a['backend']} ({a['device_kind']}, {a['device_count']} device(s)); "
                  + ", ".join(f"{k} {v}" for k, v in a["versions"].items()) + f"; {a['machine']}.", "",
                  f"Attention implementation for {a['preset']} in bf16 (`attention_implementation(\"auto\", ...)`): "
                  f"**{a['chosen']}**.", ""]
    else:
        lines += ["Attention phase: no result (failed or timed out).", ""]
    shell = data.get("shell", {})
    if shell:
        rc = shell.get("pytest_rc")
        lines += [f"Install: {shell.get('install') or '-'}. GPU pytest subset: "
                  + ("not run" if rc is None else "passed" if rc == 0 else f"FAILED (exit code {rc})") + ".", ""]
    step = data.get("step")
    if step:
        ok = [r for r in step.values() if "error" not in r]
        peak = ok[0]["peak_source"] if ok else "-"
        lines += [f"Step time ({PRECISION}, random weights, LoRA on query and value, AdamW; median of the timed steps "
                  f"after warm-up; MFU against {peak}):", "",
                  "| variant | model | frozen GB | LoRA params | micro x seq | attention | first step s | "
                  "median step ms | tokens/s | MFU | peak GB | loss first / last |",
                  "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|"]
        for name, r in step.items():
            if "error" in r:
                lines.append(f"| {name} | FAILED: {r['error']} | | | | | | | | | | |")
                continue
            lines.append(f"| {name}{' (' + r['quantize'] + ')' if r['quantize'] else ''} | {r['model']} | "
                         f"{fmt_gb(r['frozen_bytes'])} | {r['n_lora']:,} | {r['micro_batch']} x {r['seq_length']} | "
                         f"{r['attention_impl']} | {r['first_step_s']:.2f} | {r['median_s'] * 1e3:.1f} | "
                         f"{r['tokens_per_s']:,.0f} | {pct(r['mfu'], '.1%')} | {fmt_gb(r['peak_bytes'])} | "
                         f"{r['loss_first']:.4f} / {r['loss_last']:.4f} |")
        lines.append("")
    memory = data.get("memory")
    if memory:
        ok = [r for r in memory if "error" not in r]
        lines += [f"Memory against LoRA rank ({ok[0]['setting'] if ok else '-'}; predicted = compiled_memory_bytes of "
                  f"memory_vs_rank.abstract_step; measured = {ok[0]['source'] if ok else '-'}, 2 steps, one process "
                  "per rank):", "",
                  "| r | LoRA params | predicted GB | measured GB | predicted / measured - 1 | peak after compile GB | "
                  "step s |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in memory:
            if "error" in r:
                lines.append(f"| {r['rank']} | FAILED: {r['error']} | | | | | |")
                continue
            lines.append(f"| {r['rank']} | {r['n_lora']:,} | {fmt_gb(r['predicted'])} | {fmt_gb(r['measured'])} | "
                         f"{pct(r['rel_error'])} | {fmt_gb(r['peak_after_compile'])} | {r['step_s']:.3f} |")
        lines.append("")
    text = "\n".join(lines)
    (out_dir(args) / "device_check.md").write_text(text + "\n")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", default="all", choices=["attention", "step", "memory", "report", "all"])
    parser.add_argument("--smoke", action="store_true", help="a tiny model and short sequences (CPU check)")
    parser.add_argument("--out", help="results directory (default: $OUT, else benchmarks/results)")
    parser.add_argument("--rank", type=int, default=16, help="step phase: LoRA rank")
    parser.add_argument("--seq-length", type=int, help="step phase (default 2048; smoke 128)")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 256], help="memory phase")
    parser.add_argument("--memory-seq-length", type=int, help=f"memory phase (default {MEMORY_SEQ}; smoke 128)")
    parser.add_argument("--child-timeout", type=float, default=240.0, help="seconds per measuring process")
    parser.add_argument("--pytest-rc", type=int, help="report: the pytest phase's exit code (device_check.sh)")
    parser.add_argument("--install", help="report: what the install step did (device_check.sh)")
    parser.add_argument("--child", choices=["step", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["lora", "qlora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.seq_length = args.seq_length or (128 if args.smoke else 2048)
    args.memory_seq_length = args.memory_seq_length or (128 if args.smoke else MEMORY_SEQ)
    if args.child:
        result = step_child(args) if args.child == "step" else memory_child(args)
        print(json.dumps(result, default=float))
        return
    phases = ["attention", "step", "memory", "report"] if args.phase == "all" else [args.phase]
    for phase in phases:
        t = time.perf_counter()
        {"attention": phase_attention, "step": phase_step, "memory": phase_memory, "report": phase_report}[phase](args)
        print(f"[{phase}: {time.perf_counter() - t:.1f} s]", flush=True)


if __name__ == "__main__":
    main()
