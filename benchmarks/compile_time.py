"""Compile time of the LoRA train step against depth: scanned layer stack vs unrolled Python loop.

The step is the real one (`jaxlora.training.step.make_train_step`: scan over 2 micro-batches,
chunked loss, AdamW on the LoRA params), lowered from abstract shapes (no weights allocated) and
compiled with `jax.jit(...).lower(...).compile()`. Prints a markdown table; `--write` appends it
to benchmarks/RESULTS.md with the machine and versions.

    python benchmarks/compile_time.py [--layers 2 32] [--repeats 3] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import jaxlora
from _results import append_section, machine
from jaxlora.training.optim import make_optimizer
from jaxlora.training.step import init_train_state, make_train_step

SHAPE = dict(name="bench-llama", model_type="llama", vocab_size=1024, padded_vocab_size=1024, n_embd=256, n_head=4,
             n_query_groups=2, intermediate_size=688, block_size=512)
LORA = jaxlora.LoRAConfig(r=8, alpha=16, query=True, key=True, value=True, projection=True, mlp=True)
MICRO_BATCHES, MICRO_BATCH, SEQ = 2, 4, 256


def compile_seconds(n_layer: int, scan_layers: bool) -> float:
    """Wall seconds to lower and compile the train step of an `n_layer` model (abstract inputs)."""
    config = jaxlora.ModelConfig(n_layer=n_layer, **SHAPE)
    model = nnx.eval_shape(lambda: jaxlora.GPT(config, LORA, scan_layers=scan_layers, rngs=nnx.Rngs(0)))
    graphdef, lora, base = jaxlora.split_lora(model)
    tx, _ = make_optimizer("adamw", lr=1e-3, total_steps=100)
    state = jax.eval_shape(lambda l: init_train_state(l, tx), lora)
    step = make_train_step(graphdef, tx, accum_steps=MICRO_BATCHES)
    tokens = jax.ShapeDtypeStruct((MICRO_BATCHES, MICRO_BATCH, SEQ), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    t0 = time.perf_counter()
    step.lower(state, base, {"input_ids": tokens, "labels": tokens}, key).compile()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    rows = []
    for n_layer in args.layers:
        row = [n_layer]
        for scan_layers in (True, False):
            times = [compile_seconds(n_layer, scan_layers) for _ in range(args.repeats)]
            row.append(statistics.median(times))
            print(f"layers={n_layer:3d} scan={scan_layers!s:5}: " + ", ".join(f"{t:.2f}s" for t in times), flush=True)
        rows.append(row)

    table = ["| layers | scanned stack (s) | unrolled loop (s) | unrolled / scanned |", "|---:|---:|---:|---:|"]
    table += [f"| {n} | {s:.2f} | {u:.2f} | {u / s:.1f}x |" for n, s, u in rows]
    print("\n".join(table))
    if args.write:
        header = (f"`python benchmarks/compile_time.py --write`: LoRA train step (d={SHAPE['n_embd']}, "
                  f"{MICRO_BATCHES} micro-batches of [{MICRO_BATCH}, {SEQ}], LoRA r={LORA.r} on all attention and "
                  f"MLP matrices, AdamW), median of {args.repeats} compiles from abstract shapes. Machine: "
                  f"{machine()}. Shared machine: absolute seconds are noisy, the ratio between rows is the point."
                  "\n\n")
        append_section("Compile time vs depth", header + "\n".join(table))


if __name__ == "__main__":
    main()
