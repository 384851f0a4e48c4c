"""Dense vs sparse expert dispatch (`model.moe_dispatch`): step time on small random MoEs, and compiled memory
and FLOPs of real-size MoE LoRA steps.

Time: a random Mixtral-shaped model (`--width` wide, `--layers` layers, `--ffn` expert width, experts and
top-k per `--experts E:K ...`), LoRA r 8 on query, value and every expert matrix, AdamW, fp32; the real
train step (`make_train_step`, one micro-batch of `--tokens` tokens per row) compiled once per dispatch,
then steps alternating dense, sparse, dense, ... on the same batch; medians after one warm-up step. The
table also gives what the "auto" rule (`models.grouped.sparse_pays`) picks for that shape, so each row
checks the rule against the measurement.

Memory and FLOPs: the LoRA train step of Mixtral-8x7B and Qwen3-30B-A3B (LoRA r 8, alpha 16, on query,
value and the experts; micro-batch 1, `--seq-length` tokens, bf16-true frozen weights, or NF4 with
`--quantize`) compiled from abstract shapes (`memory_vs_rank.abstract_step`: nothing allocated);
memory = argument + temp + (output - alias) of `memory_analysis()`; FLOPs: what the step's frozen matmuls
and attention execute with each dispatch (`executed_flops`; LoRA's own FLOPs left out). On CPU 16-bit steps are compiled in
32-true, as memory_vs_rank does by default, so the memory is an upper bound (f32 activations).

    python benchmarks/moe_dispatch.py [--experts 8:2 64:8] [--tokens 256 1024] [--repeats 5]
        [--models Mixtral-8x7B-v0.1 Qwen3-30B-A3B] [--seq-length 512] [--quantize none nf4] [--skip-time]
        [--skip-memory] [--write]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jaxlora  # noqa: E402
from _results import append_section, machine  # noqa: E402
from jaxlora.models.grouped import sparse_pays, tile_rows  # noqa: E402
from jaxlora.training.metrics import compiled_memory_bytes, model_flops_per_token  # noqa: E402
from jaxlora.training.optim import make_optimizer  # noqa: E402
from jaxlora.training.step import init_train_state, make_train_step  # noqa: E402
from memory_vs_rank import Setting, abstract_step, measure_precision  # noqa: E402

TARGETS = ("query", "value", "mlp")
GB = 1e9


def small_moe(width: int, layers: int, ffn: int, experts: int, top_k: int) -> jaxlora.ModelConfig:
    return jaxlora.ModelConfig(name=f"moe-{experts}x{top_k}", model_type="mixtral", vocab_size=4096, padded_vocab_size=4096, n_layer=layers,
                               n_embd=width, n_head=width // 64, n_query_groups=width // 64, head_size=64,
                               intermediate_size=ffn, mlp_class="LLaMAMoE", norm_class="RMSNorm", bias=False,
                               rotary_percentage=1.0, parallel_residual=False, n_expert=experts,
                               n_expert_per_token=top_k, block_size=4096)


def time_row(config: jaxlora.ModelConfig, tokens: int, repeats: int) -> dict:
    """Median step seconds of dense and sparse dispatch on one micro-batch of `tokens` tokens (alternating)."""
    lora = jaxlora.LoRAConfig(r=8, alpha=16, **{t: True for t in TARGETS})
    tx, _ = make_optimizer("adamw", lr=1e-4, total_steps=1000)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, 1, tokens)).astype(np.int32)
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids)}
    key = jax.random.key(0)
    runs = {}
    for dispatch in ("dense", "sparse"):
        model = jaxlora.GPT(config, lora, moe_dispatch=dispatch, rngs=nnx.Rngs(0))
        graphdef, params, base = jaxlora.split_lora(model)
        step = make_train_step(graphdef, tx, accum_steps=1)
        state = init_train_state(params, tx)
        t0 = time.perf_counter()
        state, m = step(state, base, batch, key)
        jax.block_until_ready(m)
        runs[dispatch] = dict(step=step, state=state, base=base, compile=time.perf_counter() - t0, times=[])
    for _ in range(repeats):
        for dispatch, r in runs.items():
            t0 = time.perf_counter()
            r["state"], m = r["step"](r["state"], r["base"], batch, key)
            jax.block_until_ready(m)
            r["times"].append(time.perf_counter() - t0)
    dense, sparse = (statistics.median(runs[d]["times"]) for d in ("dense", "sparse"))
    return dict(experts=config.n_expert, top_k=config.n_expert_per_token, tokens=tokens, dense_s=dense,
                sparse_s=sparse, ratio=dense / sparse, compile_dense=runs["dense"]["compile"],
                compile_sparse=runs["sparse"]["compile"],
                auto="sparse" if sparse_pays(tokens, config.n_expert, config.n_expert_per_token) else "dense")


def memory_row(model: str, dispatch: str, seq_length: int, quantize: str | None) -> dict:
    s = Setting(name=model, model=model, rank=8, targets=TARGETS, alpha=16, micro_batch=1, seq_length=seq_length,
                accum_steps=1, precision="bf16-true", remat="none", mode="scan", quantize=quantize,
                moe_dispatch=dispatch)
    t0 = time.perf_counter()
    step, args, _, _ = abstract_step(s, measure_precision(s, cpu_native=False))
    memory = compiled_memory_bytes(step.lower(*args).compile())
    return dict(model=model, dispatch=dispatch, quantize=quantize or "bf16", seq=seq_length, memory=memory,
                flops=executed_flops(jaxlora.ModelConfig.from_name(model), dispatch, seq_length),
                compile_s=time.perf_counter() - t0)


def executed_flops(config: jaxlora.ModelConfig, dispatch: str, tokens: int) -> float:
    """FLOPs a step over `tokens` tokens executes in its frozen matmuls (forward + input gradient) and attention
    (`metrics.model_flops_per_token` without LoRA), counting the expert rows each dispatch really multiplies:
    dense every expert for every token, sparse top-k per token plus the most tile padding (E x (tile - 1) rows).
    (XLA's cost_analysis counts a loop body once, so it cannot count scanned layers or tiles.)"""
    e, k = config.n_expert, config.n_expert_per_token
    rows = tokens * k
    per_token = e if dispatch == "dense" else (rows + e * (tile_rows(rows, e) - 1)) / tokens
    return tokens * model_flops_per_token(dataclasses.replace(config, n_expert_per_token=per_token), 0, tokens)


def time_table(rows: list[dict]) -> list[str]:
    out = ["| experts : top-k | tokens | dense step (s) | sparse step (s) | dense / sparse | compile dense / sparse (s) "
           "| auto picks | auto right? |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        faster = "sparse" if r["ratio"] > 1 else "dense"
        out.append(f"| {r['experts']}:{r['top_k']} | {r['tokens']} | {r['dense_s']:.3f} | {r['sparse_s']:.3f} | "
                   f"{r['ratio']:.2f}x | {r['compile_dense']:.1f} / {r['compile_sparse']:.1f} | {r['auto']} | "
                   f"{'yes' if r['auto'] == faster else 'no'} |")
    return out


def memory_table(rows: list[dict]) -> list[str]:
    out = ["| model | frozen | seq | dispatch | compiled memory (GB) | executed step FLOPs (T) | sparse / dense FLOPs |",
           "|---|---|---|---|---|---|---|"]
    dense = {(r["model"], r["quantize"]): r for r in rows if r["dispatch"] == "dense"}
    for r in rows:
        ref = dense.get((r["model"], r["quantize"]))
        share = f"{r['flops'] / ref['flops']:.2f}" if ref and r["dispatch"] == "sparse" else ""
        out.append(f"| {r['model']} | {r['quantize']} | {r['seq']} | {r['dispatch']} | {r['memory'] / GB:.2f} | "
                   f"{r['flops'] / 1e12:.1f} | {share} |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", nargs="+", default=["8:2", "64:8"], help="E:K pairs")
    p.add_argument("--tokens", nargs="+", type=int, default=[64, 256, 1024])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models", nargs="+", default=["Mixtral-8x7B-v0.1", "Qwen3-30B-A3B"])
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--quantize", nargs="+", default=["none"],
                   help="frozen formats of the memory rows: none (bf16) and/or models.quant formats, e.g. none nf4")
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    lines = [f"Machine: {machine()}", f"Command: `python benchmarks/moe_dispatch.py {' '.join(sys.argv[1:])}`", ""]
    if not args.skip_time:
        rows = []
        for pair in args.experts:
            e, k = (int(x) for x in pair.split(":"))
            config = small_moe(args.width, args.layers, args.ffn, e, k)
            for tokens in args.tokens:
                rows.append(time_row(config, tokens, args.repeats))
                print("\n".join(time_table(rows[-1:])[2:]), flush=True)
        lines += [f"Step time, fp32, random {args.layers}-layer MoE (width {args.width}, expert width {args.ffn}), "
                  f"LoRA r 8 on query, value and the experts, one micro-batch of `tokens` tokens, median of "
                  f"{args.repeats} alternating steps:", "", *time_table(rows), ""]
    if not args.skip_memory:
        rows = []
        for model in args.models:
            for fmt in args.quantize:
                for dispatch in ("dense", "sparse"):
                    rows.append(memory_row(model, dispatch, args.seq_length, None if fmt == "none" else fmt))
                    print(memory_table(rows[-1:])[2], f"(compiled in {rows[-1]['compile_s']:.0f} s)", flush=True)
        lines += [f"Compiled LoRA train step (abstract; LoRA r 8 on query, value and the experts; micro-batch 1; "
                  f"backend {jax.default_backend()}: 16-bit steps compiled in 32-true on CPU, an upper bound):",
                  "", *memory_table(rows), ""]
    print("\n".join(lines))
    if args.write:
        append_section("MoE: dense vs sparse expert dispatch", "\n".join(lines))


if __name__ == "__main__":
    main()
