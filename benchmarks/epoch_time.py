"""One epoch of an Alpaca-shaped SFT dataset three ways: jaxlora packed, jaxlora padded, PyTorch + peft.

The same random Llama per size (`throughput.SIZES`, saved once as an HF checkpoint by
`throughput.save_checkpoint`), the same LoRA (r 8, alpha 16, every attention and MLP matrix, no
dropout) starting from the same weights (peft initialises the adapter, saves it, and jaxlora loads it
with `load_with_adapter`), AdamW at a constant lr (no warmup, no weight decay) on both sides, the same
precision, the same examples:

  packed  `data.packed.pack_examples` rows of --max-seq-length, batched by `BatchIterator` with
          length_bucket 64 (each global batch padded to its longest row, rounded up to 64), reshaped
          to [accum, micro, seq] (`finetune.step_batches`), `make_train_step` (scan over micro-batches)
  padded  the examples themselves through the same `BatchIterator` (each global batch padded to its
          longest example, rounded up to 64) and train step
  torch   transformers + peft, the examples in the same order as `padded`, each micro-batch padded
          to its own longest example (LitGPT's collate), gradient accumulation by backward() per
          micro-batch (loss / accum), torch.optim.AdamW

Global batch and micro-batch count examples for `padded` and `torch`. For `packed` they count rows,
chosen by this rule: the packed micro-batch is max(1, round(micro x mean example length /
max_seq_length)) rows (about the real tokens of a padded micro-batch; --packed-micro-batch overrides
it), and the accumulation steps are max(1, round(rows / (padded steps per epoch x packed micro)));
so `packed` takes about as many optimizer steps per epoch as `padded` and `torch`, each over about
the same number of real tokens. The last global batch of an epoch is kept (jaxlora fills it with
all-padding rows, which carry no loss, as `finetune` does; torch takes a shorter step, as LitGPT does).

Dataset: --examples random token sequences whose lengths (prompt + response, in tokens) follow
Alpaca's: drawn from the histogram of the 52,002 tokenized Alpaca examples (LLaMA tokenizer, the
Alpaca prompt template, BOS + EOS) that tloen/alpaca-lora's lengths.ipynb prints
(https://github.com/tloen/alpaca-lora/blob/main/lengths.ipynb, commit 13d55f4; its `plt.hist(lens)`
output and `len([l for l in lens if l < 256])` = 49513): edges 60, 184.5, 309, ..., 1305 tokens,
counts 42516, 8250, 983, 191, 35, 16, 9, 0, 1, 1, the second bin split at 256 by the 49513; a length
is uniform within its bin; lengths above --max-seq-length are cut to it (LitGPT cuts too). That
gives a median of ~136 tokens and a mean of ~146 (the real distribution's shape inside the first
bin, which holds 82% of the examples, is not published: uniform is an assumption). Labels of the
first 40% of each example's tokens are -100 (the masked Alpaca prompt); ids are uniform over the vocab.

Per method: epoch wall time (median of --repeats epochs, each from the same initial LoRA and
optimizer state and the same batches, methods alternating packed, padded, torch, packed, ...;
batches built before the clock starts), real tokens/s (non-padding input tokens / epoch time),
padding fraction (padded positions / positions computed), optimizer steps, loss (token-weighted mean
over the epoch, and of its last step), and for jaxlora the warm-up excluded from the epochs: one
step per distinct batch shape (compiles included). "x torch" = torch epoch time / this method's.

    python benchmarks/epoch_time.py [--sizes 5m 100m] [--precision 32-true bf16-true] [--examples 512]
        [--max-seq-length 512] [--global-batch 16] [--micro-batch 4] [--packed-micro-batch N]
        [--rank 8] [--lr 2e-4] [--repeats 1] [--write]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch

import jaxlora
from _results import append_section, machine
from jaxlora.data import BatchIterator
from jaxlora.data.packed import pack_examples
from jaxlora.finetune import step_batches
from jaxlora.training.loop import real_tokens
from jaxlora.training.optim import make_optimizer
from jaxlora.training.precision import POLICIES
from jaxlora.training.step import init_train_state, make_train_step
from throughput import BUSY, PEFT_MODULES, SIZES, TARGETS, TORCH_DTYPES, cpu_seconds, save_checkpoint, timed

IGNORE = -100
PAD_ID = 0
BUCKET = 64  # BatchIterator's length_bucket, finetune's default (data.length_bucket)
PROMPT_SHARE = 0.4  # labels of the first 40% of an example's tokens are masked
METHODS = ("packed", "padded", "torch")

# Token lengths of the 52,002 Alpaca examples (LLaMA tokenizer, prompt template, BOS + EOS), from the
# histogram in tloen/alpaca-lora lengths.ipynb (module docstring): bin edges and example counts, the
# notebook's second bin [184.5, 309) split at 256 by its count of examples shorter than 256 (49513).
ALPACA_EDGES = (60, 184.5, 256, 309, 433.5, 558, 682.5, 807, 931.5, 1056, 1180.5, 1305)
ALPACA_COUNTS = (42516, 6997, 1253, 983, 191, 35, 16, 9, 0, 1, 1)
ALPACA_SOURCE = ("the histogram of the 52,002 tokenized Alpaca examples (LLaMA tokenizer, prompt template, BOS + "
                 "EOS) printed by tloen/alpaca-lora lengths.ipynb (https://github.com/tloen/alpaca-lora/blob/main/"
                 "lengths.ipynb, commit 13d55f4): edges 60, 184.5, 309, ..., 1305 tokens, counts 42516, 8250, 983, "
                 "191, 35, 16, 9, 0, 1, 1, and 49513 examples under 256 tokens; uniform within each bin")


def alpaca_lengths(n: int, max_len: int, rng: np.random.Generator) -> np.ndarray:
    """n example lengths (tokens) drawn from Alpaca's histogram, cut to max_len."""
    counts = np.array(ALPACA_COUNTS, dtype=np.float64)
    bins = rng.choice(len(counts), size=n, p=counts / counts.sum())
    low, high = np.array(ALPACA_EDGES[:-1])[bins], np.array(ALPACA_EDGES[1:])[bins]
    lengths = np.floor(low + rng.random(n) * (high - low)).astype(np.int64)
    return np.minimum(lengths, max_len)


def make_dataset(n: int, max_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """n examples {"input_ids", "labels"} (int32): random ids, Alpaca's lengths, the first 40% of labels masked."""
    rng = np.random.default_rng(seed)
    examples = []
    for length in alpaca_lengths(n, max_len, rng):
        ids = rng.integers(1, vocab, length, dtype=np.int32)  # 0 is the padding id
        labels = ids.copy()
        labels[:round(PROMPT_SHARE * length)] = IGNORE
        examples.append({"input_ids": ids, "labels": labels})
    return examples


class JaxRunner:
    """One epoch of jaxlora's train step over batches built beforehand (`epoch()`)."""

    def __init__(self, graphdef, lora_params, base, tx, batches: list[dict], accum: int):
        self.lora_params, self.base, self.tx = lora_params, base, tx
        self.train_step = make_train_step(graphdef, tx, accum_steps=accum)
        self.batches = batches
        self.key = jax.random.key(0)
        self.real = sum(real_tokens(b) for b in batches)
        self.padding = 1.0 - self.real / sum(b["input_ids"].size for b in batches)

    def warm_up(self) -> tuple[float, int]:
        """One step per distinct batch shape (compiling each) from a throwaway state -> (seconds, shapes)."""
        shapes = {}
        for b in self.batches:
            shapes.setdefault(b["input_ids"].shape, b)
        t = time.perf_counter()
        for b in shapes.values():
            state, metrics = self.train_step(init_train_state(self.lora_params, self.tx), self.base, b, self.key)
            jax.block_until_ready(metrics)
        return time.perf_counter() - t, len(shapes)

    def epoch(self) -> dict:
        state = init_train_state(self.lora_params, self.tx)  # the same start every epoch
        jax.block_until_ready(state)
        t = time.perf_counter()
        metrics = []
        for b in self.batches:
            state, m = self.train_step(state, self.base, b, self.key)
            metrics.append(m)
        metrics = jax.device_get(metrics)  # waits for the last step
        seconds = time.perf_counter() - t
        sums = [float(m["loss"]) * int(m["tokens"]) for m in metrics]
        counts = [int(m["tokens"]) for m in metrics]
        return dict(seconds=seconds, loss=sum(sums) / sum(counts), last_loss=float(metrics[-1]["loss"]))


class TorchRunner:
    """transformers + peft + torch AdamW: the examples in `order`, micro-batches padded to their longest."""

    def __init__(self, path: Path, precision: str, rank: int, lr: float, adapter_dir: Path):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[precision])
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=PEFT_MODULES)
        self.model = get_peft_model(model, config)
        self.model.save_pretrained(adapter_dir)  # jaxlora starts from these LoRA weights
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.initial = [p.detach().clone() for p in self.params]
        self.lr = lr
        self.steps: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def set_batches(self, examples: list[dict], order: np.ndarray, global_batch: int, micro: int) -> None:
        """Optimizer steps of `global_batch` examples in `order` (the last one shorter), micro-batches of
        `micro` consecutive examples, each padded (ids PAD_ID, labels IGNORE) to its longest."""
        self.steps, positions = [], 0
        for start in range(0, len(order), global_batch):
            step = []
            chosen = order[start:start + global_batch]
            for m in range(0, len(chosen), micro):
                rows = [examples[i] for i in chosen[m:m + micro]]
                width = max(len(r["input_ids"]) for r in rows)
                ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
                labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
                for j, r in enumerate(rows):
                    ids[j, :len(r["input_ids"])] = torch.from_numpy(r["input_ids"].astype(np.int64))
                    labels[j, :len(r["labels"])] = torch.from_numpy(r["labels"].astype(np.int64))
                step.append((ids, labels))
                positions += ids.numel()
            self.steps.append(step)
        self.real = sum(len(examples[i]["input_ids"]) for i in order)
        self.padding = 1.0 - self.real / positions

    def reset(self) -> None:
        with torch.no_grad():
            for p, p0 in zip(self.params, self.initial):
                p.copy_(p0)
        self.opt = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=0.0)

    def step(self, micro_batches) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step (LitGPT: mean loss per micro-batch / accum) -> (loss sum, target count)."""
        loss_sum, count = torch.zeros(()), torch.zeros((), dtype=torch.long)
        for ids, labels in micro_batches:
            loss = self.model(input_ids=ids, labels=labels).loss
            (loss / len(micro_batches)).backward()
            n = (labels[:, 1:] != IGNORE).sum()
            loss_sum, count = loss_sum + loss.detach().float() * n, count + n
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss_sum, count

    def warm_up(self) -> float:
        self.reset()
        seconds = timed(lambda: self.step(self.steps[0]))[0]
        return seconds

    def epoch(self) -> dict:
        self.reset()
        t = time.perf_counter()
        results = [self.step(s) for s in self.steps]
        seconds = time.perf_counter() - t
        total = sum(float(s) for s, _ in results) / sum(int(c) for _, c in results)
        last_sum, last_count = results[-1]
        return dict(seconds=seconds, loss=total, last_loss=float(last_sum) / int(last_count))


def run_size(size: str, precision: str, args: argparse.Namespace) -> dict:
    """The three methods on one model size and precision; -> one table block's figures."""
    path = save_checkpoint(size, args.checkpoints)
    examples = make_dataset(args.examples, args.max_seq_length, SIZES[size]["vocab_size"])
    lengths = np.array([len(e["input_ids"]) for e in examples])
    if args.global_batch % args.micro_batch:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of --micro-batch {args.micro_batch}")
    accum = args.global_batch // args.micro_batch
    padded_steps = math.ceil(len(examples) / args.global_batch)

    # torch first: it initialises the LoRA weights every method starts from
    adapter_dir = args.checkpoints / f"adapter-{size}-{precision}-r{args.rank}"
    torch_runner = TorchRunner(path, precision, args.rank, args.lr, adapter_dir)

    policy = POLICIES[precision]
    model = jaxlora.load_with_adapter(path, adapter_dir, dtype=policy.param_dtype, compute_dtype=policy.compute_dtype)
    graphdef, lora_params, base = jaxlora.split_lora(model)
    del model
    tx, _ = make_optimizer("adamw", lr=args.lr, total_steps=10**6, warmup_steps=0, min_lr=args.lr)  # constant lr

    data = dict(seed=0, seq_len=args.max_seq_length, pad_id=PAD_ID, ignore_index=IGNORE, drop_last=False,
                length_bucket=BUCKET)
    padded_iter = BatchIterator(examples, args.global_batch, **data)
    padded_batches = list(itertools.islice(step_batches(padded_iter, accum), padded_iter.steps_per_epoch))
    rows = pack_examples(examples, args.max_seq_length, seed=0, pad_id=PAD_ID, ignore_index=IGNORE)
    packed_micro = args.packed_micro_batch or max(1, round(args.micro_batch * lengths.mean() / args.max_seq_length))
    packed_accum = max(1, round(len(rows) / (padded_steps * packed_micro)))
    packed_iter = BatchIterator(rows, packed_micro * packed_accum, **data)
    packed_batches = list(itertools.islice(step_batches(packed_iter, packed_accum), packed_iter.steps_per_epoch))
    runners = {"packed": JaxRunner(graphdef, lora_params, base, tx, packed_batches, packed_accum),
               "padded": JaxRunner(graphdef, lora_params, base, tx, padded_batches, accum),
               "torch": torch_runner}
    torch_runner.set_batches(examples, padded_iter._epoch_order(0), args.global_batch, args.micro_batch)  # noqa: SLF001
    shape = {"packed": f"{packed_micro} x {packed_accum} rows", "padded": f"{args.micro_batch} x {accum}",
             "torch": f"{args.micro_batch} x {accum}"}
    steps = {"packed": len(packed_batches), "padded": len(padded_batches), "torch": len(torch_runner.steps)}
    assert runners["packed"].real == runners["padded"].real == torch_runner.real == lengths.sum()

    warm = {name: runners[name].warm_up() for name in ("packed", "padded")}
    warm["torch"] = (torch_runner.warm_up(), 1)
    epochs = {name: [] for name in METHODS}
    t0, (machine0, own0) = time.perf_counter(), cpu_seconds()
    for _ in range(args.repeats):
        for name in METHODS:
            time.sleep(0.2)  # let the previous runner's worker threads go idle
            epochs[name].append(runners[name].epoch())
            print(f"{size} {precision} {name}: epoch {epochs[name][-1]['seconds']:.2f} s, "
                  f"loss {epochs[name][-1]['loss']:.4f}", flush=True)
    wall, (machine1, own1) = time.perf_counter() - t0, cpu_seconds()
    others = max(0.0, (machine1 - machine0) - (own1 - own0)) / (wall * os.cpu_count())
    median = {name: statistics.median(e["seconds"] for e in epochs[name]) for name in METHODS}
    return dict(size=size, precision=precision, n_lora=sum(x.size for x in jax.tree.leaves(lora_params)),
                lengths=lengths, rows=len(rows), shape=shape, steps=steps, median=median, epochs=epochs,
                real=int(lengths.sum()), padding={n: runners[n].padding for n in METHODS}, warm=warm, others=others)


def table(rows: list[dict]) -> list[str]:
    lines = ["| size | precision | method | global batch (micro x accum) | optimizer steps | epoch s | real tok/s | "
             "padding | x torch | loss epoch / last step | JAX warm-up s (shapes) | CPU used by others |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        for name in METHODS:
            last = r["epochs"][name][-1]
            seconds, shapes = r["warm"][name]
            warm = f"{seconds:.1f} ({shapes})" if name != "torch" else "-"
            lines.append(f"| {r['size']} | {r['precision']} | {name} | {r['shape'][name]} | {r['steps'][name]} | "
                         f"{r['median'][name]:.2f} | {r['real'] / r['median'][name]:,.0f} | {r['padding'][name]:.1%} | "
                         f"{r['median']['torch'] / r['median'][name]:.2f}x | {last['loss']:.4f} / "
                         f"{last['last_loss']:.4f} | {warm} | {r['others']:.0%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--precision", nargs="+", default=["32-true"], choices=list(TORCH_DTYPES))
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--global-batch", type=int, default=16, help="examples per optimizer step (padded, torch)")
    parser.add_argument("--micro-batch", type=int, default=4, help="examples per micro-batch (padded, torch)")
    parser.add_argument("--packed-micro-batch", type=int, help="rows per packed micro-batch (default: module doc)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--repeats", type=int, default=1, help="timed epochs per method (alternating)")
    parser.add_argument("--checkpoints", type=Path, default=Path(tempfile.gettempdir()) / "jaxlora-bench",
                        help="where the random HF checkpoints and initial adapters are saved")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    load_start = os.getloadavg()
    rows = [run_size(size, precision, args) for size in args.sizes for precision in args.precision]
    load_end = os.getloadavg()
    lengths = rows[0]["lengths"]
    busy = max(r["others"] for r in rows) > 0.05
    text = "\n".join([
        f"`python benchmarks/epoch_time.py {' '.join(sys.argv[1:])}`: one epoch of {args.examples} examples, "
        f"LoRA r={args.rank} alpha={2 * args.rank} on {', '.join(TARGETS)} (no dropout, the same initial adapter on "
        f"both sides), AdamW lr {args.lr:g} constant; max_seq_length {args.max_seq_length}; padded and torch: "
        f"global batch {args.global_batch} examples, micro-batch {args.micro_batch}; packed: rows of "
        f"{args.max_seq_length} ({rows[0]['rows']} rows), micro-batch and accumulation chosen for about the same "
        f"steps per epoch (epoch_time.py docstring). Median of {args.repeats} epoch(s) per method, alternating, "
        "after a warm-up (jaxlora: one step per batch shape, compiles included; torch: one step).",
        f"Example lengths (prompt + response, tokens): {ALPACA_SOURCE}; cut to {args.max_seq_length} "
        f"({int((lengths == args.max_seq_length).sum())} cut here); this draw: mean {lengths.mean():.0f}, median "
        f"{np.median(lengths):.0f}, p95 {np.percentile(lengths, 95):.0f}, max {lengths.max()}. Labels of the first "
        f"{PROMPT_SHARE:.0%} of each example masked (-100).",
        f"Load average (1 min) {load_start[0]:.2f} at start, {load_end[0]:.2f} at end"
        f"{BUSY if busy else ''}. {machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {__import__('transformers').__version__}, peft {__import__('peft').__version__}.",
        "", *table(rows)])
    print("\n" + text)
    if args.write:
        append_section("Epoch time: packed vs padded vs PyTorch + PEFT", text)


if __name__ == "__main__":
    main()
