"""Memory of a LoRA or QLoRA train step against LoRA rank, for real model sizes, from abstract compiles.

The step is the real one (`make_train_step`: the recipe's micro-batches, chunked fp32 loss, AdamW
on the LoRA params), lowered from abstract shapes (`nnx.eval_shape`, `jax.ShapeDtypeStruct`; no
weights allocated) and compiled; its memory is `argument + temp + (output - alias)` of
`memory_analysis()`. Per row: frozen weights (with `--quantize`: the quantized kernels' codes and
scales, and the params kept in the param dtype: embedding, norms, router, head), LoRA params and
optimizer state (exact pytree sizes), floor = their sum, activations = compiled total - floor
(activations, temporaries, gradients, batch), total. r=0 has nothing to train: its row is a forward
pass with the loss (XLA drops the backward), the frozen model's floor.

CPU and 16-bit precisions: XLA's CPU backend computes every bf16 op but dots in f32, with f32
temporaries a GPU does not need (the stacked weights and saved activations no longer get f32
copies: `jaxlora.models.packing`; the llama-3.2-1B recipe compiled in bf16-true on CPU needs 6.20 GB,
8.53 GB before that change, against 3.06 GB estimated below). On CPU this script therefore measures
the activations by compiling the same step in 32-true and reports, for a 16-bit policy,
  total = 16-bit floor + f32 activations                 (upper bound: activations stored in f32)
  est   = 16-bit floor + f32 activations x 2 / 4         (estimate: activations in the 16-bit compute dtype)
`est` halves the few fp32-by-design buffers too (a loss chunk's logits, LoRA gradients, norm
statistics), so it is slightly low where those matter (large vocabularies). `--cpu-native` compiles
in the policy itself instead (what a CPU run of that policy uses). On GPU/TPU both columns are the
compiled total. The CPU scheduler flag below makes XLA honour rematerialisation (STACK_NOTES; its
older spelling `--xla_cpu_enable_concurrency_optimized_scheduler=false` is deprecated; without
either, llama-3.2-1B's activations read 1.39 GB instead of 1.10).

Default run: every config-hub recipe at its own settings (remat none, and the est. under the
`--compare-remat` policies), and a rank sweep (0..256) for three models; writes
benchmarks/results/memory_vs_rank.{csv,md,png}; `--write` appends RESULTS.md. `--quantize` takes
every setting from the QLoRA recipes instead (`configs/finetune/<name>/qlora.py`: r, alpha, targets,
micro-batch, precision and quantize format; FMT, e.g. int8, replaces the recipe's format), compares
with LitGPT's qlora.yaml peaks and writes memory_vs_rank_qlora.{csv,md,png}.
`--verify NAME` also runs two real steps of NAME in a subprocess and compares its peak RSS with
the prediction.

    python benchmarks/memory_vs_rank.py [--models RECIPE ...] [--sweep-models NAME ...] [--ranks R ...]
        [--targets recipe|all|query,value,...] [--precision P] [--micro-batch N] [--seq-length T]
        [--accum-steps N] [--remat none|block|POLICY] [--compare-remat POLICY ...]
        [--accumulation scan|multisteps] [--quantize [FMT]]
        [--cpu-native] [--verify NAME] [--write]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED").strip()

import argparse  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jaxlora  # noqa: E402
from _results import append_section, machine  # noqa: E402
from jaxlora.config import load_config  # noqa: E402
from jaxlora.models import quant  # noqa: E402
from jaxlora.models.linear import linear_layers  # noqa: E402
from jaxlora.models.lora import LORA_TARGETS  # noqa: E402
from jaxlora.training.metrics import compiled_memory_bytes  # noqa: E402
from jaxlora.training.optim import make_optimizer  # noqa: E402
from jaxlora.training.precision import POLICIES  # noqa: E402
from jaxlora.training.step import init_train_state, make_train_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results")
GB = 1e9

# config-hub recipe -> (ModelConfig preset, LitGPT's peak memory for its lora.yaml, for its qlora.yaml) on
# 1x A10G, bf16-true, from LitGPT's config_hub/finetune/README.md; "OOM" = did not fit 24 GB; None = not reported.
RECIPES = {
    "falcon-7b": ("falcon-7b", 16.69, 9.44), "gemma-2b": ("gemma-2b", 12.62, 11.58),
    "gemma-7b": ("gemma-7b", "OOM", 17.18), "gemma2-2b": ("gemma-2-2b", None, None),
    "gemma2-9b": ("gemma-2-9b", "OOM", 20.92), "llama-2-7b": ("Llama-2-7b-hf", 19.77, 13.68),
    "llama-3-8b": ("Meta-Llama-3-8B", 19.73, 17.41), "llama-3.1-8b": ("Llama-3.1-8B", 19.73, 17.41),
    "llama-3.2-1B": ("Llama-3.2-1B", 4.49, None), "llama-3.2-3B": ("Llama-3.2-3B", None, None),
    "mistral-7b": ("Mistral-7B-v0.1", 20.66, 14.29), "mistral-7b-v0.2": ("Mistral-7B-v0.2", 20.66, 14.29),
    "phi-2": ("phi-2", 13.98, 14.27), "phi-3": ("Phi-3-mini-4k-instruct", 19.75, 19.13),
    "stablelm-base-alpha-3b": ("stablelm-base-alpha-3b", 8.58, 5.24),
    "tiny-llama": ("TinyLlama-1.1B-intermediate-step-1431k-3T", 13.50, 16.24),
}
# jaxlora's own recipes (families the config hub does not cover): no LitGPT figure to compare with
OWN_RECIPES = {
    "qwen3-0.6b": "Qwen3-0.6B", "qwen3-1.7b": "Qwen3-1.7B", "qwen3-4b": "Qwen3-4B", "qwen3-8b": "Qwen3-8B",
    "gemma3-1b": "gemma-3-1b-pt", "gemma3-4b": "gemma-3-4b-pt", "olmo2-1b": "OLMo-2-0425-1B", "olmo2-7b": "OLMo-2-1124-7B",
    "smollm3-3b": "SmolLM3-3B", "granite-3.3-2b": "granite-3.3-2b-base", "granite-3.3-8b": "granite-3.3-8b-base",
    "stablelm-2-1.6b": "stablelm-2-1_6b",
}
SWEEP_MODELS = ("llama-3.2-1B", "phi-2", "llama-2-7b")
SWEEP_RANKS = (0, 4, 8, 16, 32, 64, 128, 256)
COMPARE_REMAT = ("dots_with_no_batch_dims_saveable", "block")
RECIPE = "recipe"  # --quantize without FMT: the format of each qlora.py recipe


@dataclasses.dataclass(frozen=True)
class Setting:
    """One train step to measure: a model, its LoRA adapter, its frozen weights' format and the step's
    shapes and policies."""

    name: str  # recipe or preset name
    model: str  # preset name
    rank: int
    targets: tuple[str, ...]
    alpha: float
    micro_batch: int
    seq_length: int
    accum_steps: int
    precision: str
    remat: str
    mode: str
    quantize: str | None  # a `models.quant` format for the block kernels (QLoRA); None: param dtype (LoRA)
    moe_dispatch: str = "auto"  # MoE models: `models.grouped.MOE_DISPATCH`

    def lora(self) -> jaxlora.LoRAConfig:
        return jaxlora.LoRAConfig(r=self.rank, alpha=self.alpha, **{t: t in self.targets for t in LORA_TARGETS})


def recipe_setting(name: str, args: argparse.Namespace, rank: int | None, remat: str) -> Setting:
    """The setting of recipe `name` (its lora.py, with `--quantize` its qlora.py), with the command line's
    overrides; a preset name that is no recipe gets the llama-2-7b recipe's settings (LoRA on query and
    value, r=32, micro-batch 2)."""
    file = "lora.py" if args.quantize is None else "qlora.py"
    path = ROOT / "configs" / "finetune" / name / file
    cfg = load_config(path if path.is_file() else ROOT / "configs" / "finetune" / "llama-2-7b" / file)
    model = RECIPES[name][0] if name in RECIPES else OWN_RECIPES.get(name, name)
    jaxlora.ModelConfig.from_name(model)  # fails early, listing the known names
    targets = tuple(t for t in LORA_TARGETS if cfg[f"lora_{t}"])
    if args.targets == "all":
        targets = LORA_TARGETS
    elif args.targets != "recipe":
        targets = tuple(args.targets.split(","))
    micro = args.micro_batch or cfg.train.micro_batch_size
    return Setting(
        name=name, model=model, rank=cfg.lora_r if rank is None else rank, targets=targets,
        alpha=cfg.lora_alpha, micro_batch=micro, seq_length=args.seq_length or cfg.train.max_seq_length,
        accum_steps=args.accum_steps or max(1, cfg.train.global_batch_size // micro),
        precision=args.precision or cfg.precision, remat=remat, mode=args.accumulation,
        quantize=quant.resolve(cfg.quantize if args.quantize in (None, RECIPE) else args.quantize))


def nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract_model(s: Setting, precision: str) -> jaxlora.GPT:
    """The model of `s` in `precision`'s dtypes, from abstract shapes (no weights allocated)."""
    policy = POLICIES[precision]
    config = jaxlora.ModelConfig.from_name(s.model)
    return nnx.eval_shape(lambda: jaxlora.GPT(config, s.lora(), param_dtype=policy.param_dtype,
                                              compute_dtype=policy.compute_dtype, quantize=s.quantize,
                                              remat=s.remat, moe_dispatch=s.moe_dispatch, rngs=nnx.Rngs(0)))


def quantized_bytes(model: jaxlora.GPT) -> int:
    """Bytes of the model's quantized kernels (codes and scales); the rest of its frozen params is float."""
    return sum(nbytes(nnx.state(layer.kernel)) for _, layer in linear_layers(model) if layer.quantized)


def abstract_step(s: Setting, precision: str):
    """-> (jitted step, its abstract arguments, abstract base params, abstract train state)."""
    graphdef, lora, base = jaxlora.split_lora(abstract_model(s, precision))
    tx, _ = make_optimizer("adamw", lr=2e-4, total_steps=1000, weight_decay=0.02,
                           multisteps=s.accum_steps if s.mode == "multisteps" else None)
    state = jax.eval_shape(lambda p: init_train_state(p, tx), lora)
    step = make_train_step(graphdef, tx, accum_steps=s.accum_steps, mode=s.mode)
    step = step.micro_step if s.mode == "multisteps" else step
    tokens = jax.ShapeDtypeStruct((s.accum_steps, s.micro_batch, s.seq_length), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    return step, (state, base, {"input_ids": tokens, "labels": tokens}, key), base, state


def measure_precision(s: Setting, cpu_native: bool) -> str:
    """The precision to compile in: the policy's own, or 32-true for 16-bit compute on CPU (module doc)."""
    policy = POLICIES[s.precision]
    if jax.default_backend() == "cpu" and not cpu_native and policy.compute_dtype.itemsize < 4:
        return "32-true"
    return s.precision


def measure(s: Setting, cpu_native: bool = False) -> dict:
    """One table row for setting `s` (sizes in bytes)."""
    measured_in = measure_precision(s, cpu_native)
    t0 = time.perf_counter()
    step, args, base_m, state = abstract_step(s, measured_in)
    total_m = compiled_memory_bytes(step.lower(*args).compile())
    seconds = time.perf_counter() - t0
    lora, opt = nbytes(state.lora), nbytes(state.opt_state)
    act = total_m - (nbytes(base_m) + lora + opt)
    model = abstract_model(s, s.precision)
    frozen = nbytes(jaxlora.split_lora(model)[2])
    floor = frozen + lora + opt
    scale = POLICIES[s.precision].compute_dtype.itemsize / POLICIES[measured_in].compute_dtype.itemsize
    litgpt = RECIPES.get(s.name, (None, None, None))[1 if s.quantize is None else 2]
    return dict(dataclasses.asdict(s), targets="+".join(s.targets), measured_in=measured_in,
                backend=jax.default_backend(), n_lora=sum(x.size for x in jax.tree.leaves(state.lora)),
                frozen=frozen, quantized=quantized_bytes(model), lora=lora, opt=opt, floor=floor, act=act,
                total=floor + act, est=floor + round(act * scale), litgpt_gb=litgpt, compile_s=round(seconds, 1))


# ---------------------------------------------------------------------------------------------
# Real run (--verify): peak RSS of a process running real steps, against the prediction


def rss_bytes(field: str) -> int:
    """VmRSS or VmHWM (peak) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def real_run(s: Setting, precision: str, steps: int = 2) -> dict:
    """Compile `s` in `precision`, allocate its arguments, run `steps` steps; -> predicted and measured bytes.

    measured = peak RSS during allocation and steps (VmHWM, reset after compiling) - RSS after compiling.
    """
    step, args, _, _ = abstract_step(s, precision)
    compiled = step.lower(*args).compile()
    predicted = compiled_memory_bytes(compiled)
    before = rss_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    state, base, batch, key = (jax.tree.map(lambda a: jnp.full(a.shape, 0.01 if jnp.issubdtype(a.dtype, jnp.floating)
                                                                 else 1, a.dtype), x)
                               if i != 3 else jax.random.key(0) for i, x in enumerate(args))
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, base, batch, key)
    jax.block_until_ready(metrics)
    return dict(predicted=predicted, measured=rss_bytes("VmHWM") - before, step_s=(time.perf_counter() - t0) / steps)


def verify(s: Setting, precisions: tuple[str, ...]) -> list[dict]:
    """Run `real_run` for each precision in a fresh subprocess (one peak per process)."""
    out = []
    for precision in precisions:
        cmd = [sys.executable, __file__, "--child", json.dumps([dataclasses.asdict(s), precision])]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        row.update(precision=precision, error=row["predicted"] / row["measured"] - 1)
        print(f"verify {s.name} {precision}: predicted {row['predicted'] / GB:.2f} GB, measured peak RSS "
              f"{row['measured'] / GB:.2f} GB ({row['error']:+.1%}), {row['step_s']:.1f} s/step", flush=True)
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Output


def gb(x) -> str:
    return f"{x / GB:.2f}"


def ratio(est: int, litgpt) -> str:
    """est / LitGPT's figure, or "-" where LitGPT has none (not reported, OOM)."""
    return f"{est / GB / litgpt:.2f}" if isinstance(litgpt, float) else "-"


def frozen_cells(r: dict, quantized: bool) -> str:
    """The frozen weights' cells of row `r`: their GB, split into quantized kernels and float params
    when the table has quantized rows."""
    if not quantized:
        return f" {gb(r['frozen'])} |"
    return f" {r['quantize'] or '-'} | {gb(r['quantized'])} | {gb(r['frozen'] - r['quantized'])} |"


def recipe_table(rows: list[dict], compare: dict[str, list[dict]]) -> list[str]:
    """One line per recipe: the breakdown of `rows`, then the est. of each `compare` remat policy."""
    quantized = any(r["quantize"] for r in rows)
    frozen = " quantize | quantized GB | float GB |" if quantized else " frozen GB |"
    extra = "".join(f" est. GB remat {p} |" for p in compare)
    lines = [f"| recipe | model | LoRA targets | r | micro x seq x accum | LoRA params |{frozen} LoRA+opt GB | "
             f"floor GB | act GB | total GB | est. GB |{extra} LitGPT A10G GB | est. / LitGPT | best est. / LitGPT |",
             "|---|---|---|---:|---|---:|" + ("---|---:|---:|" if quantized else "---:|") + "---:|" * 5 +
             "---:|" * len(compare) + "---:|---:|---:|"]
    for i, r in enumerate(rows):
        ests = [r["est"]] + [c[i]["est"] for c in compare.values()]
        lit = r["litgpt_gb"]
        lines.append(f"| {r['name']} | {r['model']} | {r['targets']} | {r['rank']} | {r['micro_batch']} x "
                     f"{r['seq_length']} x {r['accum_steps']} | {r['n_lora']:,} |{frozen_cells(r, quantized)} "
                     f"{gb(r['lora'] + r['opt'])} | {gb(r['floor'])} | {gb(r['act'])} | {gb(r['total'])} | "
                     f"{gb(r['est'])} |" + "".join(f" {gb(e)} |" for e in ests[1:]) +
                     f" {lit if lit is not None else 'n/r'} | {ratio(r['est'], lit)} | {ratio(min(ests), lit)} |")
    return lines


def sweep_table(rows: list[dict]) -> list[str]:
    lines = ["| model | r | LoRA params | frozen GB | LoRA GB | opt GB | floor GB | act GB | total GB | est. GB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['rank']} | {r['n_lora']:,} | {gb(r['frozen'])} | {gb(r['lora'])} | {gb(r['opt'])} | "
              f"{gb(r['floor'])} | {gb(r['act'])} | {gb(r['total'])} | {gb(r['est'])} |" for r in rows]
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ranks = sorted({r["rank"] for r in rows})
    for name in dict.fromkeys(r["name"] for r in rows):
        pts = sorted((r["rank"], r["est"] / GB) for r in rows if r["name"] == name)
        ax.plot([ranks.index(k) for k, _ in pts], [v for _, v in pts], marker="o", label=name)
    ax.set_xticks(range(len(ranks)), [str(k) for k in ranks])
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("train step memory, GB (est.)")
    method = f"QLoRA ({rows[0]['quantize']})" if rows[0]["quantize"] else "LoRA"
    ax.set_title(f"{method} step memory vs rank ({rows[0]['precision']}, remat {rows[0]['remat']}, "
                 f"{jax.default_backend()} compile)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(RECIPES),
                        help="recipes (or presets) measured at their own rank (default: every recipe)")
    parser.add_argument("--sweep-models", nargs="*", default=list(SWEEP_MODELS), help="models swept over --ranks")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(SWEEP_RANKS))
    parser.add_argument("--targets", default="recipe", help="recipe, all, or a comma list of " + ",".join(LORA_TARGETS))
    parser.add_argument("--precision", choices=list(POLICIES), help="default: the recipe's (bf16-true)")
    parser.add_argument("--micro-batch", type=int, help="default: the recipe's")
    parser.add_argument("--seq-length", type=int, help="default: the recipe's max_seq_length (512)")
    parser.add_argument("--accum-steps", type=int, help="default: the recipe's global / micro batch")
    parser.add_argument("--remat", default="none", help="none, block, or a jax.checkpoint_policies name")
    parser.add_argument("--compare-remat", nargs="*", default=list(COMPARE_REMAT),
                        help="recipes only: also the est. under these remat policies")
    parser.add_argument("--accumulation", choices=["scan", "multisteps"], default="scan")
    parser.add_argument("--quantize", nargs="?", const=RECIPE, metavar="FMT",
                        help="QLoRA: every setting from the qlora.py recipes, frozen kernels in FMT (default: the "
                        f"recipe's; one of {', '.join(sorted(quant.QUANTIZE))})")
    parser.add_argument("--cpu-native", action="store_true", help="on CPU, compile 16-bit policies as they are")
    parser.add_argument("--verify", metavar="NAME", help="also run real steps of NAME and compare peak RSS")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--write", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quantize not in (None, RECIPE):
        quant.resolve(args.quantize)  # fails early, listing the known formats

    if args.child:
        fields, precision = json.loads(args.child)
        print(json.dumps(real_run(Setting(**{**fields, "targets": tuple(fields["targets"])}), precision)))
        return

    recipes, compare, sweep = [], {p: [] for p in args.compare_remat}, []
    for name in args.models:
        recipes.append(measure(recipe_setting(name, args, None, args.remat), args.cpu_native))
        for policy in args.compare_remat:
            compare[policy].append(measure(recipe_setting(name, args, None, policy), args.cpu_native))
        print(recipe_table(recipes[-1:], {p: c[-1:] for p, c in compare.items()})[-1], flush=True)
    for name in args.sweep_models:
        for rank in args.ranks:
            sweep.append(measure(recipe_setting(name, args, rank, args.remat), args.cpu_native))
            print(sweep_table(sweep[-1:])[-1], flush=True)
    checks = []
    if args.verify:
        # at most 2 micro-batches per step: the peak is the same (one micro-batch's activations at a time)
        s = recipe_setting(args.verify, args, None, args.remat)
        s = dataclasses.replace(s, accum_steps=min(s.accum_steps, 2))
        checks = verify(s, tuple(dict.fromkeys((measure_precision(s, args.cpu_native), s.precision))))

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "memory_vs_rank" if args.quantize is None else "memory_vs_rank_qlora"
    rows = recipes + [r for c in compare.values() for r in c] + sweep
    if rows:
        with open(args.out / f"{stem}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if sweep:
        plot(sweep, args.out / f"{stem}.png")
    backend = f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
    header = (f"Backend: {backend}; {machine()}. "
              f"Command: `python benchmarks/memory_vs_rank.py {' '.join(sys.argv[1:])}`.")
    parts = [header]
    recipe_file = "lora.py" if args.quantize is None else "qlora.py"
    if recipes:
        parts += ["", f"Config-hub {recipe_file} recipes at their own settings ({recipes[0]['precision']}; breakdown "
                  f"for remat {args.remat}; act measured in {recipes[0]['measured_in']}):", "",
                  *recipe_table(recipes, compare)]
    if sweep:
        parts += ["", f"Rank sweep ({recipe_file} settings, {sweep[0]['precision']}, targets: {args.targets}, remat "
                  f"{args.remat}; act measured in {sweep[0]['measured_in']}):", "", *sweep_table(sweep),
                  "", f"![memory vs rank](results/{stem}.png)"]
    if checks:
        parts += ["", f"Real run of `{args.verify}` ({s.micro_batch} x {s.seq_length} x {s.accum_steps}, remat "
                  f"{s.remat}, 2 steps; measured = peak RSS - RSS after compiling):", "",
                  "| precision | predicted GB | measured GB | error | s/step |", "|---|---:|---:|---:|---:|"]
        parts += [f"| {c['precision']} | {gb(c['predicted'])} | {gb(c['measured'])} | {c['error']:+.1%} | "
                  f"{c['step_s']:.1f} |" for c in checks]
    text = "\n".join(parts)
    (args.out / f"{stem}.md").write_text(text + "\n")
    print("\n" + text)
    if args.write:
        append_section("Memory vs LoRA rank" if args.quantize is None else "QLoRA memory", text)


if __name__ == "__main__":
    main()
