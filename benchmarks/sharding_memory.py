"""Per-device memory of a 7B LoRA train step on 8 devices: FSDP (1x8x1) against data parallelism (8x1x1).

The step is the real one (`make_train_step` with the train state's shardings: scan over the
micro-batches, chunked fp32 loss, AdamW on the LoRA params), lowered from abstract inputs that
carry their shardings (`jax.ShapeDtypeStruct(..., sharding=)`; nothing is allocated) on a mesh of
8 forced CPU devices, and compiled. `memory_analysis()` of an SPMD program is per device; the
table reports, per device:

  frozen     bytes of this device's shard of the frozen weights (exact, from the shardings)
  LoRA+opt   bytes of its LoRA params and AdamW moments
  argument / temp / total   compiled: total = argument + temp + output - alias
  max gather the largest buffer an all-gather produces (0: none): with FSDP one layer's weight
             at a time, never a whole stacked weight or the model

Both meshes split the batch 8 ways (data x fsdp = 8), so each device gets the same rows.
CPU caveats: XLA's CPU backend computes bf16 elementwise ops in f32, with f32 temporaries, so bf16
temp memory on CPU is an upper bound for GPU/TPU; the 32-true rows avoid that. The CPU scheduler flag set below makes
XLA honour rematerialisation.

    python benchmarks/sharding_memory.py [--model Llama-2-7b-hf] [--precision bf16-true 32-true]
        [--micro-batch 2] [--seq-length 512] [--accum-steps 2] [--rank 32] [--remat none block] [--write]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jaxlora  # noqa: E402
from _results import append_section, machine  # noqa: E402
from jaxlora.training import sharding as sh  # noqa: E402
from jaxlora.training.metrics import compiled_memory_bytes  # noqa: E402
from jaxlora.training.optim import make_optimizer  # noqa: E402
from jaxlora.training.precision import POLICIES  # noqa: E402
from jaxlora.training.step import init_train_state, make_train_step  # noqa: E402

GB = 1e9
MESHES = ((8, 1, 1), (1, 8, 1))
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8,
          "s64": 8}


def shard_bytes(tree) -> int:
    """Bytes one device holds of the ShapeDtypeStructs (with shardings) in `tree` (device 0's share)."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def largest_gather(hlo: str) -> int:
    """Bytes of the largest all-gather result in optimized HLO text."""
    sizes = [np.prod([int(n) for n in dims.split(",") if n], dtype=np.int64) * _BYTES[dtype]
             for dtype, dims in re.findall(r"= (\w+)\[([\d,]*)\][^=]*? all-gather(?:-start)?\(", hlo)]
    return int(max(sizes, default=0))


def measure(args, mesh_shape: tuple[int, int, int], precision: str, remat: str) -> dict:
    policy = POLICIES[precision]
    config = jaxlora.ModelConfig.from_name(args.model)
    lora = jaxlora.LoRAConfig(r=args.rank, alpha=16, dropout=0.05, query=True, value=True)  # the recipe's LoRA
    model = nnx.eval_shape(lambda: jaxlora.GPT(config, lora, param_dtype=policy.param_dtype,
                                               compute_dtype=policy.compute_dtype, remat=remat, rngs=nnx.Rngs(0)))
    graphdef, lora_params, base = jaxlora.split_lora(model)
    mesh = sh.make_mesh(mesh_shape)
    tx, _ = make_optimizer("adamw", lr=2e-4, total_steps=100)
    state = jax.eval_shape(lambda p: init_train_state(p, tx), lora_params)
    state_sharding = sh.train_state_shardings(state, sh.param_shardings(lora_params, mesh), tx)
    state = with_shardings(state, state_sharding)
    base_in = with_shardings(nnx.to_pure_dict(base), sh.param_shardings(base, mesh))
    rows = args.micro_batch * sh.data_parallel_size(mesh)  # the global micro-batch
    tokens = jax.ShapeDtypeStruct((args.accum_steps, rows, args.seq_length), jnp.int32,
                                  sharding=NamedSharding(mesh, sh.BATCH_SPEC))
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=NamedSharding(mesh, P()))
    step = make_train_step(graphdef, tx, accum_steps=args.accum_steps, state_sharding=state_sharding)
    t0 = time.perf_counter()
    compiled = step.lower(state, base_in, {"input_ids": tokens, "labels": tokens}, key).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    return {"mesh": "x".join(map(str, mesh_shape)), "precision": precision, "remat": remat,
            "frozen": shard_bytes(base_in),
            "lora_opt": shard_bytes((state.lora, state.opt_state)), "argument": m.argument_size_in_bytes,
            "temp": m.temp_size_in_bytes,
            "total": compiled_memory_bytes(compiled),
            "gather": largest_gather(compiled.as_text()), "compile_s": seconds}


def table(rows: list[dict]) -> str:
    lines = ["| mesh (data x fsdp x tensor) | precision | remat | frozen (GB) | LoRA+opt (GB) | argument (GB) "
             "| temp (GB) | total (GB) | max gather (GB) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mesh']} | {r['precision']} | {r['remat']} | {r['frozen'] / GB:.2f} | "
                     f"{r['lora_opt'] / GB:.3f} | "
                     f"{r['argument'] / GB:.2f} | {r['temp'] / GB:.2f} | {r['total'] / GB:.2f} | "
                     f"{r['gather'] / GB:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Llama-2-7b-hf")
    parser.add_argument("--precision", nargs="+", default=["bf16-true", "32-true"], choices=sorted(POLICIES))
    parser.add_argument("--micro-batch", type=int, default=2, help="rows per device per micro-batch")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--accum-steps", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--remat", nargs="+", default=["none", "block"], help="rematerialisation policies")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    assert jax.device_count() == 8, jax.devices()

    rows = []
    for precision in args.precision:
        for remat in args.remat:
            for shape in MESHES:
                rows.append(measure(args, shape, precision, remat))
                r = rows[-1]
                print(f"{r['mesh']} {precision} remat {remat}: total {r['total'] / GB:.2f} GB per device "
                      f"(compiled in {r['compile_s']:.0f} s)", flush=True)
    text = table(rows)
    print(text)
    if args.write:
        command = "python benchmarks/sharding_memory.py " + " ".join(sys.argv[1:])
        header = (f"`{command}`: LoRA r={args.rank}, alpha 16, dropout 0.05 on query and value (the llama-2-7b "
                  f"recipe), AdamW, {args.accum_steps} micro-batches of [{args.micro_batch}, {args.seq_length}] per "
                  "device; per-device figures of the compiled step on 8 forced CPU devices (abstract inputs, "
                  f"`memory_analysis()`). Machine: {machine()}. bf16 rows: the CPU backend computes bf16 "
                  "elementwise ops in f32, so their temp is an upper bound for GPU/TPU.\n\n")
        append_section(f"Per-device memory: FSDP vs data parallelism, {args.model}", header + text)


if __name__ == "__main__":
    main()
