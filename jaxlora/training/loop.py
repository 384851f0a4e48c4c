"""The training loop `fit`: steps, logging, validation and checkpoint cadence, preemption, end-of-run summary
(the job that builds its inputs from a config is `jaxlora.finetune`).

`fit` takes everything already built (jitted steps, train state, frozen params, batch iterators),
so it runs on synthetic batches and a random model as well as in a real job.

Cadence, in optimizer steps: log every `log_interval`; validate every `eval_interval` over
`eval_max_iters` batches (the initial and final validations use the whole validation set, as
LitGPT); save every `save_interval` and at the end. Each step's metrics are fetched before the
next step is dispatched (the next batch is prepared while the device works), so a non-finite
loss stops the run at the step that produced it, before anything of that step is saved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxlora import storage
from jaxlora.errors import JaxloraError
from jaxlora.training import metrics as run_metrics
from jaxlora.training.preemption import Preemption
from jaxlora.training.sharding import BATCH_SPEC, EVAL_BATCH_SPEC, global_batch_from_local
from jaxlora.training.step import TrainState

log = logging.getLogger(__name__)


class DivergenceError(JaxloraError):
    """The loss or gradient became NaN/inf."""


@dataclasses.dataclass(frozen=True)
class FitSettings:
    max_steps: int  # stop once the train state reaches this optimizer step (resumed steps count)
    max_time: float | None = None  # stop (and save) after this many seconds of this call
    log_interval: int = 1
    eval_interval: int | None = None  # None or 0: no periodic validation
    eval_max_iters: int = 100  # batches per periodic validation
    initial_validation: bool = False
    final_validation: bool = True
    save_interval: int | None = None  # None or 0: save only at the end
    csv: bool = True  # <out_dir>/metrics.csv
    tensorboard: bool = False  # <out_dir>/tensorboard/
    progress_bar: bool | None = None  # None: when stdout is a terminal


@dataclasses.dataclass
class FitResult:
    state: TrainState
    step: int
    val_loss: float | None
    summary: dict
    preempted: bool = False  # stopped early by SIGTERM (the state of `step` is saved)


def fit(state: TrainState, base, *, train_step, eval_step, train_batches: Iterator[dict], key: jax.Array,
        mesh, settings: FitSettings, out_dir: str | os.PathLike,
        val_batches: Iterable[dict] | Callable[[], Iterable[dict]] | None = None,
        schedule: Callable[[int], Any] | None = None, checkpoints=None,
        data_position: Callable[[], dict] | None = None, run_config: dict | None = None,
        flops_per_token: float | None = None, peak_flops: float | None = None,
        sample: Callable[[Any, int], None] | None = None) -> FitResult:
    """Train from `state` until `settings.max_steps`, the end of `train_batches`, or `max_time`.

    train_batches: this process's rows of each optimizer step's batch, numpy
      {"input_ids", "labels"} int32 [accum, local_micro_batch, seq].
    val_batches: numpy [local_batch, seq] batches; re-iterated (or called) for every validation.
    key: the run's base dropout key (replicated); schedule(k): the lr of optimizer step k + 1.
    checkpoints: a `checkpoints.orbax.CheckpointManager` (None: no saving); data_position()
      gives the iterator position after the current step's batch, saved with the state.
    flops_per_token / peak_flops: for MFU in the summary (see `metrics`); None: no MFU.
    sample(lora, step): called after each validation in the loop (e.g. `Sampler.at_validation`).
    """
    s = settings
    out_dir = storage.path(out_dir)  # local, or a URL (gs://...): see `jaxlora.storage`
    primary = jax.process_index() == 0
    step = start_step = int(jax.device_get(state.step))
    writer = run_metrics.MetricsWriter(out_dir, csv_file=s.csv, tensorboard=s.tensorboard, start_step=start_step)
    show_bar = sys.stdout.isatty() if s.progress_bar is None else s.progress_bar
    bar = tqdm(total=s.max_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stdout,
               disable=not (primary and show_bar))
    validate = functools.partial(_validate, eval_step, base, val_batches, mesh)
    interval = _Interval()
    times: list[float] = []  # seconds per step
    step_tokens: list[int] = []  # real input tokens (padding excluded: `real_tokens`) per step
    positions = 0  # input positions, padding included
    shapes: set[tuple] = set()  # the step batch shapes seen: each compiles the step once
    tokens = 0
    val_loss = val_exact = None
    initial = {}  # the initial validation's loss and exact match, for the summary
    t_begin = time.perf_counter()
    preempted = False
    preemption = Preemption().install()
    try:
        if s.initial_validation and val_batches is not None:
            val_loss, val_exact = validate(state.lora, None)
            _check_finite_val(start_step, val_loss)
            initial = {"initial_val_loss": val_loss, "initial_val_exact_match": val_exact}
            _log_val(writer, start_step, val_loss, val_exact)
        nxt = _next_batch(train_batches, mesh, data_position) if step < s.max_steps else None
        t_last = time.perf_counter()
        while nxt is not None:
            batch, position = nxt
            state, step_metrics = train_step(state, base, batch, key)
            step += 1
            step_tokens.append(real_tokens(batch))
            tokens += step_tokens[-1]
            positions += int(batch["input_ids"].size)
            shapes.add(tuple(batch["input_ids"].shape))
            nxt = _next_batch(train_batches, mesh, data_position) if step < s.max_steps else None
            m = jax.device_get(step_metrics)  # waits for the step
            now = time.perf_counter()
            times.append(now - t_last)
            _check_finite(step, m)
            interval.add(m, times[-1], step_tokens[-1])
            bar.update(1)
            bar.set_postfix(loss=f"{float(m['loss']):.4f}", refresh=False)

            preempted, out_of_time = preemption.requested(s.max_time is not None and now - t_begin >= s.max_time)
            last = nxt is None or out_of_time or preempted
            val = exact = None
            if last and not preempted and s.final_validation and val_batches is not None:
                val, exact = validate(state.lora, None)
            elif s.eval_interval and step % s.eval_interval == 0 and val_batches is not None:
                val, exact = validate(state.lora, s.eval_max_iters)
            if val is not None:
                _check_finite_val(step, val)
                val_loss, val_exact = val, exact
                if sample is not None:
                    sample(state.lora, step)
            if step % s.log_interval == 0 or last or val is not None:
                lr = None if schedule is None else float(schedule(step - 1))
                row = interval.row(step, lr, tokens, position, elapsed=now - t_begin)
                row.update(_val_columns(val, exact))
                writer.write(row)
                _log_row(row, s.max_steps)
            if checkpoints is not None and (last or (s.save_interval and step % s.save_interval == 0)):
                writer.sync()  # a URL out_dir: the CSV on it holds every row up to the saved step
                checkpoints.save(state, rng=key, data_position=position, val_loss=val, config=run_config)
            if preempted:
                log.warning("stopped at step %d on request, that step saved%s", step,
                            "" if checkpoints is None else f" in {checkpoints.directory}")
            elif out_of_time:
                log.info("stopping at step %d: max_time of %.0f s reached", step, s.max_time)
            if last:
                break
            t_last = time.perf_counter()  # validation and saving do not count as step time
    finally:
        bar.close()
        writer.close()
        if checkpoints is not None:
            checkpoints.wait_until_finished()  # also on errors: earlier saves must complete
        preemption.uninstall()
    summary = _summary(times, step_tokens, step, start_step, val_loss, flops_per_token, peak_flops)
    summary.update(padding_fraction=1 - tokens / positions if positions else None, batch_shapes=len(shapes))
    summary.update(initial, **({"val_exact_match": val_exact} if val_exact is not None else {}))
    if primary:
        _log_summary(summary)
        storage.write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return FitResult(state=state, step=step, val_loss=val_loss, summary=summary, preempted=preempted)


def _next_batch(batches: Iterator[dict], mesh, data_position) -> tuple[dict, dict | None] | None:
    """The next step batch as global arrays (transfer started), and the data position after it."""
    try:
        local = next(batches)
    except StopIteration:
        return None
    position = data_position() if data_position is not None else None
    batch = {k: global_batch_from_local(np.asarray(v), mesh, BATCH_SPEC) for k, v in local.items()}
    return batch, position


def _validate(eval_step, base, val_batches, mesh, lora, max_iters: int | None) -> tuple[float | None, float | None]:
    """(token-weighted mean validation loss, exact-match fraction of the scored examples) over the first
    `max_iters` batches (None: all); exact match is None unless `eval_step` reports it (`make_eval_step`)."""
    batches = val_batches() if callable(val_batches) else val_batches
    sums = []
    for i, local in enumerate(batches):
        if max_iters is not None and i >= max_iters:
            break
        batch = {k: global_batch_from_local(np.asarray(v), mesh, EVAL_BATCH_SPEC) for k, v in local.items()}
        sums.append(eval_step(lora, base, batch))
    sums = jax.device_get(sums)
    total, count = sum(float(s[0]) for s in sums), sum(int(s[1]) for s in sums)
    if count == 0:
        log.warning("validation found no tokens with labels: no val loss")
        return None, None
    exact = None
    if sums and len(sums[0]) == 4:
        exact = sum(int(s[2]) for s in sums) / max(sum(int(s[3]) for s in sums), 1)
    return total / count, exact


def _check_finite(step: int, m: dict) -> None:
    loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise DivergenceError(
            f"training diverged at step {step} (loss {loss}, gradient norm {grad_norm}), so that step was not "
            "saved; lower the learning rate, set max_norm, or use a wider precision")


def _check_finite_val(step: int, val_loss: float | None) -> None:
    if val_loss is not None and not math.isfinite(val_loss):
        raise DivergenceError(
            f"the validation loss at step {step} is {val_loss}, so that step was not saved; lower the learning "
            "rate, set max_norm, or use a wider precision")


class _Interval:
    """Train metrics accumulated since the last logged row."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.losses, self.grad_norms, self.times, self.tokens, self.router_aux = [], [], [], 0, []

    def add(self, m: dict, step_time: float, tokens: int):
        self.losses.append(float(m["loss"]))
        if "router_aux_loss" in m:  # MoE with train.router_aux_loss_coef > 0
            self.router_aux.append(float(m["router_aux_loss"]))
        self.grad_norms.append(float(m["grad_norm"]))
        self.times.append(step_time)
        self.tokens += tokens

    def row(self, step: int, lr: float | None, total_tokens: int, position: dict | None, elapsed: float) -> dict:
        step_time = float(np.mean(self.times))
        row = {"step": step, "epoch": None if position is None else position.get("epoch"),
               "loss": float(np.mean(self.losses)), "lr": lr, "grad_norm": float(np.mean(self.grad_norms)),
               "tokens": total_tokens, "step_time": step_time, "tokens_per_s": self.tokens / sum(self.times),
               "elapsed": elapsed}
        if self.router_aux:
            row["router_aux_loss"] = float(np.mean(self.router_aux))
        self.reset()
        return row


def _val_columns(val_loss: float | None, exact: float | None = None) -> dict:
    if val_loss is None:
        return {}
    columns = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}
    return columns if exact is None else {**columns, "val_exact_match": exact}


def _log_val(writer, step: int, val_loss: float | None, exact: float | None) -> None:
    if val_loss is None:
        return
    row = {"step": step, **_val_columns(val_loss, exact)}
    writer.write(row)
    text = f"step {step}: val loss {row['val_loss']:.4f}, val ppl {row['val_ppl']:.2f}"
    log.info(text + ("" if exact is None else f", val exact match {100 * exact:.1f}%"))


def _log_row(row: dict, max_steps: int) -> None:
    text = (f"step {row['step']}/{max_steps}: loss {row['loss']:.4f}, grad norm {row['grad_norm']:.4f}, "
            f"{row['step_time'] * 1000:.0f} ms/step, {row['tokens_per_s']:.0f} tokens/s")
    if row["lr"] is not None:
        text += f", lr {row['lr']:.3e}"
    if "router_aux_loss" in row:
        text += f", router aux loss {row['router_aux_loss']:.4f}"
    if "val_loss" in row:
        text += f", val loss {row['val_loss']:.4f}, val ppl {row['val_ppl']:.2f}"
    if "val_exact_match" in row:
        text += f", val exact match {100 * row['val_exact_match']:.1f}%"
    log.info(text)


def real_tokens(batch: dict) -> int:
    """The batch's input tokens that are not padding (segment_ids > 0; every token without segment_ids)."""
    if "segment_ids" not in batch:
        return int(batch["input_ids"].size)
    return int(jax.device_get(jnp.sum(batch["segment_ids"] > 0, dtype=jnp.int32)))


def _summary(times, step_tokens, step, start_step, val_loss, flops_per_token, peak_flops) -> dict:
    """Totals over this call. tokens/s excludes the first step (compilation) when there are others."""
    skip = 1 if len(times) > 1 else 0
    steady_time = sum(times[skip:])
    tokens_per_s = sum(step_tokens[skip:]) / steady_time if steady_time > 0 else None
    mem, mem_source = run_metrics.peak_memory()
    mfu = (flops_per_token * tokens_per_s / peak_flops
           if flops_per_token and peak_flops and tokens_per_s else None)
    return {"steps": step - start_step, "final_step": step, "tokens": sum(step_tokens),
            "train_time_s": float(sum(times)),
            "tokens_per_s": tokens_per_s, "peak_memory_bytes": mem, "peak_memory_source": mem_source,
            "flops_per_token": flops_per_token, "peak_flops": peak_flops, "mfu": mfu, "val_loss": val_loss}


def _log_summary(summary: dict) -> None:
    tps, mfu, mem = summary["tokens_per_s"], summary["mfu"], summary["peak_memory_bytes"]
    pad = summary.get("padding_fraction")
    log.info("trained %d steps (to step %d): %d real tokens in %.1f s; %s tokens/s%s; padding %s; %d batch "
             "shape(s), each compiled once; peak memory %s (%s); MFU %s",
             summary["steps"], summary["final_step"], summary["tokens"], summary["train_time_s"],
             "n/a" if tps is None else f"{tps:.0f}", " (first step excluded)" if summary["steps"] > 1 else "",
             "n/a" if pad is None else f"{100 * pad:.1f}%", summary.get("batch_shapes", 0),
             "n/a" if mem is None else f"{mem / 2**30:.2f} GiB", summary["peak_memory_source"],
             "n/a" if mfu is None else f"{100 * mfu:.1f}%")
    before, after = summary.get("initial_val_loss"), summary["val_loss"]
    if before is not None and after is not None:
        text = f"validation before -> after training: loss {before:.4f} -> {after:.4f}"
        exact_before, exact_after = summary.get("initial_val_exact_match"), summary.get("val_exact_match")
        if exact_before is not None and exact_after is not None:
            text += f", exact match {100 * exact_before:.1f}% -> {100 * exact_after:.1f}%"
        log.info(text)
