"""Decoding speed of `jaxlora.generate`: compile time, first-token latency and tokens/s.

The model is an HF checkpoint: `--checkpoint_dir`, else the demo checkpoint (`demo/**/config.json`
in the repository) if there is one, else a random Llama of ~5M parameters (d=256, 4 layers,
vocab 4096, as `benchmarks/throughput.py`'s "5m") saved as an HF checkpoint in a temporary
directory and loaded back. Prompts are random token ids (no stop tokens, so every row generates
`--new_tokens`); decoding is greedy.

Per batch size: compile = lowering + compiling the whole generate function once (prefill and
decode loop); first token = prefill of the prompt batch and the first sampled token, fetched to
the host; decode tokens/s = b * (new_tokens - 1) / (generate - first token); end-to-end tokens/s =
b * new_tokens / generate. Timed figures are medians of `--repeats` runs after compilation.
`--write` appends the table to benchmarks/RESULTS.md.

    python benchmarks/decode.py [--checkpoint_dir DIR] [--batch 1 8] [--prompt_len 128] [--new_tokens 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import jaxlora
from _results import append_section, machine
from jaxlora.generate import Sampling, _generate, _prefill_jit, _settings, left_pad, stop_array
from jaxlora.training.precision import POLICIES

RANDOM_5M = dict(name="llama-5m", model_type="llama", vocab_size=4096, padded_vocab_size=4096, n_layer=4, n_embd=256,
                 n_head=4, n_query_groups=4, intermediate_size=688, block_size=2048)
REPO = Path(__file__).resolve().parent.parent


def find_checkpoint(given: str | None) -> tuple[Path | None, str]:
    """(checkpoint dir or None for the random model, a description of the model's source)."""
    if given:
        return Path(given), f"checkpoint `{given}`"
    demo = sorted((REPO / "demo").glob("**/config.json")) if (REPO / "demo").is_dir() else []
    if demo:
        path = demo[0].parent
        return path, f"the demo checkpoint `{path.relative_to(REPO)}`"
    return None, "a random ~5M-parameter Llama (d=256, 4 layers, 4 heads, vocab 4096) saved as HF and loaded back"


def load(checkpoint: Path | None, precision: str, tmp: str):
    policy = POLICIES[precision]
    if checkpoint is None:
        from jaxlora.checkpoints.hf_export import save_hf_checkpoint

        model = jaxlora.GPT(jaxlora.ModelConfig(**RANDOM_5M), rngs=nnx.Rngs(0))
        checkpoint = save_hf_checkpoint(model, Path(tmp) / "llama-5m")
    return jaxlora.load_model(checkpoint, dtype=policy.param_dtype, compute_dtype=policy.compute_dtype)


def measure(model, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, prompt_len) for _ in range(batch)]
    ids, mask = left_pad(prompts, bucket=prompt_len)
    params, static = _settings(model, new_tokens, Sampling(), None)
    args = (params, ids, mask, stop_array(()), jax.random.key(0))

    t0 = time.perf_counter()
    run = _generate.lower(*args, **static).compile()
    compile_s = time.perf_counter() - t0
    prefill = _prefill_jit.lower(*args, **static).compile()

    def timed(fn, fetch):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.device_get(fetch(fn(*args)))
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    first = timed(prefill, lambda s: s.token)
    total = timed(run, lambda out: out)
    tokens, lengths = jax.device_get(run(*args))
    assert (lengths == new_tokens).all()
    return {"batch": batch, "compile_s": compile_s, "first_ms": 1000 * first, "total_s": total,
            "decode_tps": batch * (new_tokens - 1) / (total - first), "e2e_tps": batch * new_tokens / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", default=None)
    parser.add_argument("--precision", default="32-true", choices=sorted(POLICIES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    checkpoint, source = find_checkpoint(args.checkpoint_dir)
    with tempfile.TemporaryDirectory() as tmp:
        model = load(checkpoint, args.precision, tmp)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    rows = []
    for batch in args.batch:
        rows.append(measure(model, batch, args.prompt_len, args.new_tokens, args.repeats))
        print(rows[-1], flush=True)
    table = ["| batch | compile (s) | first token (ms) | generate (s) | decode tokens/s | end-to-end tokens/s |",
             "|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {r['batch']} | {r['compile_s']:.2f} | {r['first_ms']:.1f} | {r['total_s']:.3f} | "
              f"{r['decode_tps']:.0f} | {r['e2e_tps']:.0f} |" for r in rows]
    print("\n".join(table))
    if args.write:
        command = "python benchmarks/decode.py " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
            if k != "write" and v is not None) + " --write"
        load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        header = (f"`{command}`: {source}, {n_params / 1e6:.1f}M parameters, {args.precision}; greedy, prompts of "
                  f"{args.prompt_len} random tokens, {args.new_tokens} new tokens per row, KV cache of "
                  f"{args.prompt_len + args.new_tokens} slots; medians of {args.repeats} runs after compilation. "
                  f"Machine: {machine()}; load average {load_avg:.1f} at the end (other jobs shared the cores).\n\n")
        append_section("Decoding speed", header + "\n".join(table))


if __name__ == "__main__":
    main()
