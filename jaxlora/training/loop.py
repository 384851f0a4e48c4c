"""The training loop `fit` (steps, logging, validation and checkpoint cadence, end-of-run summary)
and the job `finetune(cfg)` that builds its inputs from a config.

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
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from flax.traverse_util import flatten_dict
from tqdm import tqdm

from jaxlora.checkpoints.orbax import CHECKPOINTS_DIR, CheckpointManager, resolve_resume, saved_steps
from jaxlora.errors import ConfigError, JaxloraError
from jaxlora.models.config import ModelConfig
from jaxlora.models.lora import LoRAConfig, split_lora
from jaxlora.training import metrics as run_metrics
from jaxlora.training.optim import make_optimizer
from jaxlora.training.precision import backend_supports_bf16, resolve_precision
from jaxlora.training.sharding import (BATCH_SPEC, EVAL_BATCH_SPEC, batch_slice, data_parallel_size,
                                       global_batch_from_local, host_copy, initialize_distributed, make_mesh,
                                       mesh_shape, param_shardings, place, replicate, shard_params,
                                       train_state_shardings)
from jaxlora.training.preemption import Preemption
from jaxlora.training.step import TrainState, init_train_state, make_eval_step, make_train_step

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
    out_dir = Path(out_dir)
    primary = jax.process_index() == 0
    step = start_step = int(jax.device_get(state.step))
    writer = run_metrics.MetricsWriter(out_dir, csv_file=s.csv, tensorboard=s.tensorboard, start_step=start_step)
    show_bar = sys.stdout.isatty() if s.progress_bar is None else s.progress_bar
    bar = tqdm(total=s.max_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stdout,
               disable=not (primary and show_bar))
    validate = functools.partial(_validate, eval_step, base, val_batches, mesh)
    interval = _Interval()
    times: list[float] = []  # seconds per step
    step_tokens: list[int] = []  # input tokens (padding included) per step
    tokens = 0
    val_loss = val_exact = None
    initial = {}  # the initial validation's loss and exact match, for the summary
    t_begin = time.perf_counter()
    preempted = False
    preemption = Preemption().__enter__()
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
            step_tokens.append(int(batch["input_ids"].size))
            tokens += step_tokens[-1]
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
        preemption.__exit__()
    summary = _summary(times, step_tokens, step, start_step, val_loss, flops_per_token, peak_flops)
    summary.update(initial, **({"val_exact_match": val_exact} if val_exact is not None else {}))
    if primary:
        _log_summary(summary)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
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
        self.losses, self.grad_norms, self.times, self.tokens = [], [], [], 0

    def add(self, m: dict, step_time: float, tokens: int):
        self.losses.append(float(m["loss"]))
        self.grad_norms.append(float(m["grad_norm"]))
        self.times.append(step_time)
        self.tokens += tokens

    def row(self, step: int, lr: float | None, total_tokens: int, position: dict | None, elapsed: float) -> dict:
        step_time = float(np.mean(self.times))
        row = {"step": step, "epoch": None if position is None else position.get("epoch"),
               "loss": float(np.mean(self.losses)), "lr": lr, "grad_norm": float(np.mean(self.grad_norms)),
               "tokens": total_tokens, "step_time": step_time, "tokens_per_s": self.tokens / sum(self.times),
               "elapsed": elapsed}
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
    if "val_loss" in row:
        text += f", val loss {row['val_loss']:.4f}, val ppl {row['val_ppl']:.2f}"
    if "val_exact_match" in row:
        text += f", val exact match {100 * row['val_exact_match']:.1f}%"
    log.info(text)


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
    log.info("trained %d steps (to step %d): %d tokens in %.1f s; %s tokens/s%s; peak memory %s (%s); MFU %s",
             summary["steps"], summary["final_step"], summary["tokens"], summary["train_time_s"],
             "n/a" if tps is None else f"{tps:.0f}", " (first step excluded)" if summary["steps"] > 1 else "",
             "n/a" if mem is None else f"{mem / 2**30:.2f} GiB", summary["peak_memory_source"],
             "n/a" if mfu is None else f"{100 * mfu:.1f}%")
    before, after = summary.get("initial_val_loss"), summary["val_loss"]
    if before is not None and after is not None:
        text = f"validation before -> after training: loss {before:.4f} -> {after:.4f}"
        exact_before, exact_after = summary.get("initial_val_exact_match"), summary.get("val_exact_match")
        if exact_before is not None and exact_after is not None:
            text += f", exact match {100 * exact_before:.1f}% -> {100 * exact_after:.1f}%"
        log.info(text)


# ---------------------------------------------------------------------------------------------
# The finetuning job


def finetune(cfg) -> FitResult:
    """Run the LoRA finetuning job of `cfg` (a `jaxlora.config` ConfigDict); what the CLI calls.

    precision -> mesh -> validation -> model (HF checkpoint) -> LoRA/frozen split -> data ->
    optimizer -> train state (fresh or resumed) -> `fit` -> `<out_dir>/final/lora.safetensors`.
    An epoch is ceil(train examples / global_batch_size) optimizer steps (the last batch is
    completed with all-padding rows, which carry no loss, as LitGPT keeps its last batch).
    """
    from jaxlora import load_model
    from jaxlora.config import accumulation_steps, validate
    from jaxlora.data import BatchIterator, Tokenizer, effective_seq_length, eval_batches, steps_per_epoch
    from jaxlora.data.sft import load_sft_records, resolve_prompt_style, tokenize_splits
    from jaxlora.training.samples import Sampler

    t = cfg.train
    d = cfg.distributed
    initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
    if jax.process_index() != 0:  # one log for the whole run
        logging.getLogger("jaxlora").setLevel(logging.WARNING)
    policy, message = resolve_precision(cfg.precision)
    log.info(message)
    mesh = mesh_from_config(cfg.mesh)
    dp = data_parallel_size(mesh)
    model_config = ModelConfig.from_hf_config(cfg.checkpoint_dir)
    # bf16 is refused only where it cannot run well at all (GPUs before sm80); CPU emulates it.
    validate(cfg, dp, backend_supports_bf16=backend_supports_bf16() or jax.default_backend() == "cpu",
             model_block_size=model_config.block_size)
    accum = accumulation_steps(cfg, dp)
    _check_out_dir(cfg.out_dir)
    resume = resolve_resume(cfg.resume, cfg.out_dir)
    old_steps = saved_steps(cfg.out_dir)
    if resume is None and old_steps:  # checked before any loading: a fresh run would mix its steps with these
        raise ConfigError(f"{Path(cfg.out_dir) / CHECKPOINTS_DIR} already holds steps {old_steps} of an earlier run; "
                          "continue it with --config.resume=auto, or choose another out_dir (or remove it)")

    run_config = json.loads(cfg.to_json_best_effort())
    if resume is not None:
        _check_resume_config(*resume, run_config)

    lora_config = LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, query=cfg.lora_query,
                             key=cfg.lora_key, value=cfg.lora_value, projection=cfg.lora_projection,
                             mlp=cfg.lora_mlp, head=cfg.lora_head, use_rslora=cfg.use_rslora)
    model = load_model(cfg.checkpoint_dir, dtype=policy.param_dtype, compute_dtype=policy.compute_dtype,
                       lora=lora_config, remat=t.remat, mesh=mesh)
    graphdef, lora_params, base = split_lora(model)
    del model
    base = shard_params(base, mesh)  # already placed by load_model: a no-op
    n_lora = sum(x.size for x in jax.tree.leaves(lora_params))

    tokenizer = Tokenizer(cfg.checkpoint_dir)
    max_seq_length = t.max_seq_length or model_config.block_size
    train_records, val_records = load_sft_records(cfg.data)
    train_data, val_data = tokenize_splits(train_records, val_records, cfg.data, tokenizer, max_seq_length,
                                           model_name=model_config.name)
    seq_len = effective_seq_length(list(train_data) + list(val_data), max_seq_length)
    total_steps = run_length(steps_per_epoch(len(train_data), t.global_batch_size, drop_last=False),
                             t.epochs, t.max_steps)
    o = cfg.optimizer
    tx, schedule = make_optimizer(
        o.name, lr=o.lr, total_steps=total_steps, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
        momentum=o.momentum, nesterov=o.nesterov, warmup_steps=t.lr_warmup_steps,
        warmup_fraction=t.lr_warmup_fraction, min_lr=t.min_lr, max_norm=t.max_norm,
        multisteps=accum if t.grad_accumulation == "multisteps" else None)

    state = init_train_state(lora_params, tx)
    state_sharding = train_state_shardings(state, param_shardings(lora_params, mesh), tx)
    state = place(state, state_sharding)
    key = replicate(jax.random.key(cfg.seed), mesh)
    position = {"epoch": 0, "index": 0, "seed": cfg.seed}
    c = cfg.checkpoint
    checkpoints = CheckpointManager(cfg.out_dir, max_to_keep=c.max_to_keep, keep_best=c.keep_best,
                                    async_save=c.async_save)
    if resume is not None:
        source_dir, step = resume
        own = Path(source_dir).absolute() == Path(cfg.out_dir).absolute()
        source = checkpoints if own else CheckpointManager(source_dir, read_only=True)
        restored = source.restore(state, step=step)
        if restored is not None:
            state, key = restored.state, replicate(restored.rng, mesh)
            position = restored.data_position or position
            log.info("resuming from step %d of %s", restored.step, source.directory)

    slice_index, slice_count = batch_slice(mesh)  # which rows of each global batch this process loads
    data = dict(seq_len=seq_len, pad_id=tokenizer.pad_id, ignore_index=cfg.data.ignore_index,
                length_bucket=cfg.data.length_bucket, process_index=slice_index, process_count=slice_count)
    batches = BatchIterator(train_data, t.global_batch_size, seed=position["seed"], epoch=position["epoch"],
                            index=position["index"], drop_last=False, **data)
    val_rows = t.micro_batch_size * dp
    val_batches = (lambda: eval_batches(val_data, val_rows, **data)) if val_data else None
    log.info("%d LoRA params; %d train examples; %d optimizer steps of %d micro-batches x %d rows x %d tokens; "
             "%d data-parallel devices", n_lora, len(train_data), total_steps, accum, t.global_batch_size // accum,
             seq_len, dp)
    settings = FitSettings(
        max_steps=total_steps, max_time=t.max_time, log_interval=t.log_interval, eval_interval=cfg.eval.interval,
        eval_max_iters=cfg.eval.max_iters, initial_validation=cfg.eval.initial_validation,
        final_validation=cfg.eval.final_validation, save_interval=t.save_interval, csv=cfg.logger.csv,
        tensorboard=cfg.logger.tensorboard)
    sampler = None
    if cfg.eval.max_new_tokens and val_data:
        sampler = Sampler(graphdef, base, val_records, resolve_prompt_style(cfg.data.prompt_style, model_config.name),
                          tokenizer, max_new_tokens=cfg.eval.max_new_tokens, max_seq_length=max_seq_length)
        if cfg.eval.initial_validation:
            sampler.generate("before", state.lora)
    try:
        result = fit(
            state, base, train_step=make_train_step(graphdef, tx, accum_steps=accum, mode=t.grad_accumulation,
                                                    state_sharding=state_sharding),
            eval_step=make_eval_step(graphdef, mesh=mesh, exact_match=cfg.eval.exact_match),
            train_batches=step_batches(batches, accum), key=key, mesh=mesh,
            settings=settings, out_dir=cfg.out_dir, val_batches=val_batches, schedule=schedule,
            checkpoints=checkpoints, data_position=batches.position, run_config=run_config,
            flops_per_token=run_metrics.model_flops_per_token(model_config, n_lora, seq_len),
            peak_flops=run_metrics.device_peak_flops(dtype=policy.compute_dtype),
            sample=None if sampler is None else sampler.at_validation)
    finally:
        checkpoints.close()
    if result.preempted:  # not finished: no final adapter that would pass for the run's result
        log.warning("the run stopped at step %d of %d; continue it with the same command and "
                    "--config.resume=auto", result.step, total_steps)
        return result
    if sampler is not None:
        sampler.generate("after", result.state.lora)
        sampler.write(cfg.out_dir)
    final_lora = host_copy(result.state.lora)  # a collective: every process takes part
    save_lora_safetensors(final_lora, Path(cfg.out_dir) / "final" / "lora.safetensors",
                          metadata={"step": str(result.step), "lora": json.dumps(dataclasses.asdict(lora_config)),
                                    "config": json.dumps(run_config)})
    if jax.process_index() == 0:  # the same adapter in PEFT's format, where PEFT can express it
        from jaxlora.checkpoints.peft import write_peft_adapter
        from jaxlora.errors import CheckpointError
        try:
            write_peft_adapter(model_config, lora_config, final_lora, Path(cfg.out_dir) / "final",
                               base_model_name_or_path=str(Path(cfg.checkpoint_dir).absolute()))
        except CheckpointError as e:
            log.warning("no PEFT adapter written: %s", e)
    return result


def _check_out_dir(out_dir: str) -> None:
    """Before anything is loaded or written: ConfigError unless out_dir is a directory or can be created."""
    path = Path(out_dir).absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out_dir {out_dir} is a file, not a directory; choose another out_dir")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"out_dir {out_dir} cannot be created: {existing} is a file; choose another out_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir {out_dir} cannot be {'written' if existing == path else 'created'}: no write "
                          f"permission on {existing}; choose another out_dir")


def _check_resume_config(source_dir: Path, step: int | None, run_config: dict) -> None:
    """Before anything is loaded: refuse to resume with settings that make the saved state unusable or
    the resume inexact (one sentence naming them); log the safe changes."""
    from jaxlora.config import resume_changes

    manager = CheckpointManager(source_dir, read_only=True)
    try:
        saved = manager.saved_config(step)
    finally:
        manager.close()
    if saved is None:
        return
    unsafe, safe = resume_changes(saved, run_config)
    if unsafe:
        raise ConfigError(f"cannot resume from {manager.directory}: the config differs from the one saved with the "
                          f"checkpoint in {'; '.join(unsafe)}; resume with the saved values, or start a new run in "
                          "another out_dir")
    for change in safe:
        log.info("resuming with a changed setting: %s", change)


def mesh_from_config(mesh_cfg):
    """The (data, fsdp, tensor) mesh of `cfg.mesh` over all devices of all processes (one size may be -1)."""
    return make_mesh(mesh_shape(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, jax.device_count()))


def run_length(steps_per_epoch: int, epochs: int | None, max_steps: int | None) -> int:
    """Optimizer steps of the run: `epochs` epochs, capped at `max_steps` (either may be None)."""
    if not epochs and not max_steps:
        raise ConfigError("set train.epochs or train.max_steps: the run needs an end")
    return min(n for n in (epochs and epochs * steps_per_epoch, max_steps) if n)


def step_batches(batches: Iterator[dict], accum: int) -> Iterator[dict]:
    """Global-batch rows [local_batch, seq] -> [accum, local_batch / accum, seq], one per optimizer step.

    Micro-batch i takes every accum-th row from row i. This process's rows are a contiguous slice
    of the global batch, so global micro-batch i is the same rows whatever the process count.
    """
    for batch in batches:
        yield {k: v.reshape(v.shape[0] // accum, accum, *v.shape[1:]).swapaxes(0, 1) for k, v in batch.items()}


def save_lora_safetensors(lora: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """The LoRA params as fp32 safetensors, keys like "blocks.attn.q.lora_a" (written by process 0)."""
    if jax.process_index() != 0:
        return
    from safetensors.numpy import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = flatten_dict(jax.device_get(lora), sep=".")
    save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(path), metadata=metadata)
