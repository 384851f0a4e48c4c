"""The finetuning job: config -> model -> data -> `fit` -> adapter export, top to bottom.

`finetune(cfg)` is what `jaxlora finetune` runs: it validates the config, refuses what would make the run
wrong or lose data (an out_dir that cannot hold it, old steps a fresh run would mix with, a resume whose
config differs in what the saved state depends on) before anything is loaded, then loads the model and
the data, builds the optimizer and train state (fresh or resumed), runs `training.loop.fit` and writes
the final adapter (`<out_dir>/final/`: lora.safetensors and, where PEFT can express it, PEFT's files).
The pieces it uses are reusable on their own: `training/` (step, loop, optimizer, precision, sharding).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from jaxlora import storage
from jaxlora.checkpoints.orbax import CHECKPOINTS_DIR, CheckpointManager, resolve_resume, saved_steps
from jaxlora.checkpoints.peft import write_peft_adapter
from jaxlora.config import accumulation_steps, lora_config, resume_changes, validate
from jaxlora.data import BatchIterator, Tokenizer, effective_seq_length, eval_batches, steps_per_epoch
from jaxlora.data.packed import pack_examples, packing_efficiency
from jaxlora.data.sft import load_sft_records, resolve_prompt_style, tokenize_splits
from jaxlora.errors import CheckpointError, ConfigError
from jaxlora.models.config import ModelConfig
from jaxlora.models import quant
from jaxlora.models.lora import split_lora
from jaxlora.training import metrics as run_metrics
from jaxlora.training.loop import FitResult, FitSettings, fit
from jaxlora.training.optim import make_optimizer
from jaxlora.training.precision import backend_supports_bf16, resolve_precision
from jaxlora.training.sharding import (batch_slice, data_parallel_size, host_copy, initialize_distributed,
                                       make_mesh, mesh_shape, param_shardings, place, replicate, shard_params,
                                       train_state_shardings)
from jaxlora.training.samples import Sampler
from jaxlora.training.step import init_train_state, make_eval_step, make_train_step

log = logging.getLogger(__name__)


def finetune(cfg) -> FitResult:
    """Run the LoRA finetuning job of `cfg` (a `jaxlora.config` ConfigDict); what the CLI calls.

    precision -> mesh -> validation and the refusals that need no loading -> data records -> model (HF
    checkpoint) -> LoRA/frozen split -> tokenized data -> optimizer -> train state (fresh or resumed) ->
    `fit` -> `<out_dir>/final/` (unless the run was preempted: then its last step is saved, nothing more).
    An epoch is ceil(train examples / global_batch_size) optimizer steps (the last batch is
    completed with all-padding rows, which carry no loss, as LitGPT keeps its last batch).
    """
    from jaxlora import load_model  # looked up at call time (tests replace it)

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
    if t.router_aux_loss_coef and model_config.mlp_class != "LLaMAMoE":
        raise ConfigError(f"train.router_aux_loss_coef={t.router_aux_loss_coef} weighs the router loss of a "
                          f"mixture-of-experts model, and {model_config.name} has no experts; leave it at 0")
    _check_out_dir(cfg.out_dir)
    resume = resolve_resume(cfg.resume, cfg.out_dir)
    old_steps = saved_steps(cfg.out_dir)
    if resume is None and old_steps:  # checked before any loading: a fresh run would mix its steps with these
        raise ConfigError(f"{storage.path(cfg.out_dir) / CHECKPOINTS_DIR} already holds steps {old_steps} of an "
                          "earlier run; continue it with --config.resume=auto, or choose another out_dir (or remove it)")

    run_config = json.loads(cfg.to_json_best_effort())
    if resume is not None:
        _check_resume_config(*resume, run_config)

    train_records, val_records = load_sft_records(cfg.data)  # read (and checked) before the model is loaded

    lora_settings = lora_config(cfg)
    model = load_model(cfg.checkpoint_dir, dtype=policy.param_dtype, compute_dtype=policy.compute_dtype,
                       lora=lora_settings, quantize=quant.resolve(cfg.quantize), remat=t.remat, mesh=mesh,
                       attention_impl=cfg.model.attention_impl, moe_dispatch=cfg.model.moe_dispatch)
    graphdef, lora_params, base = split_lora(model)
    del model
    base = shard_params(base, mesh)  # already placed by load_model: a no-op
    n_lora = sum(x.size for x in jax.tree.leaves(lora_params))

    tokenizer = Tokenizer(cfg.checkpoint_dir)
    max_seq_length = t.max_seq_length or model_config.block_size
    train_data, val_data = tokenize_splits(train_records, val_records, cfg.data, tokenizer, max_seq_length,
                                           model_name=model_config.name)
    seq_len = effective_seq_length(list(train_data) + list(val_data), max_seq_length)
    train_rows = train_data
    if cfg.data.packing:  # rows of max_seq_length (or of the longest example), the same on resume
        width = t.max_seq_length or seq_len
        train_rows = pack_examples(train_data, width, seed=cfg.seed, pad_id=tokenizer.pad_id,
                                   ignore_index=cfg.data.ignore_index)
        log.info("packed %d train examples into %d rows of %d tokens (%.1f%% of the positions hold tokens)",
                 len(train_data), len(train_rows), width, 100 * packing_efficiency(train_rows))
        seq_len = max(seq_len, width)
    total_steps = run_length(steps_per_epoch(len(train_rows), t.global_batch_size, drop_last=False),
                             t.epochs, t.max_steps)
    o = cfg.optimizer
    tx, schedule = make_optimizer(
        o.name, lr=o.lr, total_steps=total_steps, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
        momentum=o.momentum, nesterov=o.nesterov, warmup_steps=t.lr_warmup_steps,
        warmup_fraction=t.lr_warmup_fraction, min_lr=t.min_lr, max_norm=t.max_norm, lora_plus_ratio=o.lora_plus_ratio,
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
        own = storage.same_location(source_dir, cfg.out_dir)
        source = checkpoints if own else CheckpointManager(source_dir, read_only=True)
        restored = source.restore(state, step=step)
        if restored is not None:
            state, key = restored.state, replicate(restored.rng, mesh)
            position = restored.data_position or position
            log.info("resuming from step %d of %s", restored.step, source.directory)

    slice_index, slice_count = batch_slice(mesh)  # which rows of each global batch this process loads
    data = dict(seq_len=seq_len, pad_id=tokenizer.pad_id, ignore_index=cfg.data.ignore_index,
                length_bucket=cfg.data.length_bucket, process_index=slice_index, process_count=slice_count)
    batches = BatchIterator(train_rows, t.global_batch_size, seed=position["seed"], epoch=position["epoch"],
                            index=position["index"], drop_last=False, **data)
    log.info("%.1f%% of this epoch's training positions are padding", 100 * batches.epoch_padding_fraction())
    val_rows = t.micro_batch_size * dp
    val_batches = (lambda: eval_batches(val_data, val_rows, **data)) if val_data else None
    log.info("%d LoRA params; %d train examples%s; %d optimizer steps of %d micro-batches x %d rows x %s tokens; "
             "%d data-parallel devices", n_lora, len(train_data),
             f" in {len(train_rows)} packed rows" if cfg.data.packing else "", total_steps, accum,
             t.global_batch_size // accum, seq_len if cfg.data.length_bucket is None else f"<= {seq_len}", dp)
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
                                                    state_sharding=state_sharding,
                                                    router_aux_loss_coef=t.router_aux_loss_coef),
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
    final_dir = storage.path(cfg.out_dir) / "final"
    save_lora_safetensors(final_lora, final_dir / "lora.safetensors",
                          metadata={"step": str(result.step), "lora": json.dumps(dataclasses.asdict(lora_settings)),
                                    "config": json.dumps(run_config)})
    if jax.process_index() == 0:  # the same adapter in PEFT's format, where PEFT can express it
        staging = storage.local_dir("jaxlora-peft-") if storage.is_url(final_dir) else None
        try:
            write_peft_adapter(model_config, lora_settings, final_lora, final_dir if staging is None else staging,
                               base_model_name_or_path=str(storage.as_path(cfg.checkpoint_dir)))
            if staging is not None:  # each file uploaded whole: see `jaxlora.storage`
                storage.upload_dir(staging, final_dir)
        except CheckpointError as e:
            log.warning("no PEFT adapter written: %s", e)
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
    return result


def _check_out_dir(out_dir: str) -> None:
    """Before anything is loaded or written: ConfigError unless out_dir is a directory or can be created
    (a URL: its package is installed, its bucket can be reached, and it is not an object)."""
    if storage.is_url(out_dir):
        path = storage.as_path(out_dir)  # ConfigError if gcsfs (or the scheme's package) is missing
        bucket = storage.bucket(out_dir)
        try:
            reachable, is_file = bucket.exists(), path.is_file()
        except Exception as e:  # noqa: BLE001 - credentials, network: whatever the store raises
            raise ConfigError(f"out_dir {out_dir} cannot be reached ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); check the URL "
                              "and the credentials (see docs/multihost.md)") from None
        if not reachable:
            raise ConfigError(f"out_dir {out_dir} cannot be created: the bucket {bucket} does not exist or cannot "
                              "be listed with these credentials; create it or choose another out_dir")
        if is_file:
            raise ConfigError(f"out_dir {out_dir} is an object, not a directory; choose another out_dir")
        return
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
    return make_mesh(mesh_shape(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, jax.device_count(), mesh_cfg.expert))


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
    """The LoRA params as fp32 safetensors, keys like "blocks.attn.q.adapter.lora_a" (written by process 0)."""
    if jax.process_index() != 0:
        return
    from safetensors.numpy import save
    flat = flatten_dict(jax.device_get(lora), sep=".")
    # written whole (a temporary file replaced over `path`, or one object upload for a URL): never half a file
    storage.write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in flat.items()}, metadata=metadata))
