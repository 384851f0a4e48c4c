"""Finetuning configuration: defaults, LitGPT config-hub recipes, command-line overrides, validation.

A config is an ``ml_collections.ConfigDict`` (locked: a misspelt key is an error, not a new field).
Keys follow LitGPT's ``finetune_lora``; the unit of every step count and interval is the optimizer
step. Fields that may be None are typed references, so ``--config.train.epochs=None`` and
``--config.train.max_steps=100`` both work on the same field set.

Warmup rule: ``train.lr_warmup_steps`` (default 100, as LitGPT) and ``train.lr_warmup_fraction``
are exclusive; a config with both set is an error. To warm up by fraction, unset the steps:
``--config.train.lr_warmup_steps=None --config.train.lr_warmup_fraction=0.1``.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections.config_dict import FieldReference

from jaxlora import storage
from jaxlora.errors import ConfigError
from jaxlora.models import lora, quant
from jaxlora.models.gpt import ATTENTION_IMPLS, REMAT_CHOICES
from jaxlora.models.grouped import MOE_DISPATCH
from jaxlora.training.optim import OPTIMIZERS
from jaxlora.training.precision import POLICIES
from jaxlora.training.sharding import MESH_AXES
from jaxlora.training.step import MODES

LORA_TARGETS = tuple(f"lora_{t}" for t in lora.LORA_TARGETS)  # the config's names of the model's LoRA switches


def _optional(value: Any, field_type: type) -> FieldReference:
    """A field that may be None (or any value of ``field_type``)."""
    return FieldReference(value, field_type=field_type)


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default (LitGPT's finetune_lora defaults where LitGPT has the field)."""
    cfg = ml_collections.ConfigDict()
    cfg.checkpoint_dir = _optional(None, str)  # required: an HF checkpoint directory
    cfg.out_dir = "out/finetune/lora"
    cfg.precision = _optional(None, str)  # None: bf16-true where the backend computes bf16, else 32-true
    cfg.seed = 1337
    cfg.resume = _optional(False, object)  # False | True | "auto" | a checkpoint path
    cfg.lora_r = 8
    cfg.lora_alpha = 16
    cfg.lora_dropout = 0.05
    cfg.lora_query = True
    cfg.lora_key = False
    cfg.lora_value = True
    cfg.lora_projection = False
    cfg.lora_mlp = False
    cfg.lora_head = False
    cfg.use_rslora = False  # scale alpha / sqrt(r) instead of alpha / r
    cfg.use_dora = False  # weight-decomposed LoRA (DoRA; with quantize: QDoRA)
    cfg.lora_targets = _optional(None, str)  # a regex over module paths (models.lora); set: replaces the switches
    cfg.lora_rank_pattern = _optional(None, object)  # {regex: rank} for paths ending in a match (PEFT's rank_pattern)
    cfg.quantize = _optional(None, str)  # None, or a frozen-base format of models.quant.QUANTIZE (QLoRA)

    cfg.train = ml_collections.ConfigDict()
    cfg.train.save_interval = 1000
    cfg.train.log_interval = 1
    cfg.train.global_batch_size = 16
    cfg.train.micro_batch_size = 1
    cfg.train.lr_warmup_steps = _optional(100, int)
    cfg.train.lr_warmup_fraction = _optional(None, float)
    cfg.train.epochs = _optional(5, int)
    cfg.train.max_steps = _optional(None, int)
    cfg.train.max_time = _optional(None, float)  # seconds of training after which the run stops
    cfg.train.max_seq_length = _optional(None, int)
    cfg.train.min_lr = 6e-5
    cfg.train.max_norm = _optional(None, float)  # gradient clipping by global norm
    cfg.train.grad_accumulation = "scan"  # one of training.step.MODES
    cfg.train.remat = "none"  # one of models.gpt.REMAT_CHOICES
    # MoE models: train on loss + coef x the router load-balancing loss (transformers' router_aux_loss_coef with
    # output_router_logits; Mixtral's config says 0.02); 0: off, as transformers' default
    cfg.train.router_aux_loss_coef = 0.0

    cfg.eval = ml_collections.ConfigDict()
    cfg.eval.interval = 100
    cfg.eval.max_iters = 100
    cfg.eval.initial_validation = False
    cfg.eval.final_validation = True
    cfg.eval.max_new_tokens = _optional(100, int)  # sample answers at each validation and before/after; None: none
    cfg.eval.exact_match = False  # also score teacher-forced exact match of the responses (needs mask_prompt)

    cfg.optimizer = ml_collections.ConfigDict()
    cfg.optimizer.name = "adamw"  # one of OPTIMIZERS (case-insensitive)
    cfg.optimizer.lr = 2e-4
    cfg.optimizer.weight_decay = 0.0
    cfg.optimizer.betas = (0.9, 0.95)
    cfg.optimizer.eps = 1e-8
    cfg.optimizer.momentum = 0.0  # sgd only
    cfg.optimizer.nesterov = False  # sgd only
    cfg.optimizer.lora_plus_ratio = _optional(None, float)  # LoRA+: B's lr = ratio x A's (None: plain LoRA)

    cfg.data = ml_collections.ConfigDict()
    cfg.data.name = "alpaca"  # "json" (local files at json_path) or a named set
    cfg.data.json_path = _optional(None, str)
    cfg.data.val_split_fraction = _optional(None, float)  # None: 0.05 for a json file, else the set's own
    cfg.data.mask_prompt = False
    cfg.data.prompt_style = _optional(None, str)  # None: the style the checkpoint's name implies
    cfg.data.ignore_index = -100
    cfg.data.seed = 42
    cfg.data.download_dir = "data"
    cfg.data.url = _optional(None, str)
    cfg.data.length_bucket = _optional(64, int)  # pad each batch to its longest row, rounded up to this; None: full
    cfg.data.packing = False  # concatenate train examples into rows (data.packed); global_batch_size counts rows

    # one of models.gpt.ATTENTION_IMPLS; one of models.grouped.MOE_DISPATCH (MoE models: dense or sparse experts)
    cfg.model = ml_collections.ConfigDict({"attention_impl": "auto", "moe_dispatch": "auto"})
    cfg.logger = ml_collections.ConfigDict({"csv": True, "tensorboard": False})
    cfg.checkpoint = ml_collections.ConfigDict()
    cfg.checkpoint.max_to_keep = _optional(None, int)  # None: keep every step
    cfg.checkpoint.keep_best = 0  # also keep this many lowest-val-loss steps (with max_to_keep)
    cfg.checkpoint.async_save = True
    # -1: the remaining devices; expert > 1 splits MoE experts (and the batch) over that many devices
    cfg.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})
    cfg.distributed = ml_collections.ConfigDict()
    cfg.distributed.coordinator_address = _optional(None, str)  # all None: single host or auto-detect
    cfg.distributed.num_processes = _optional(None, int)
    cfg.distributed.process_id = _optional(None, int)
    cfg.lock()
    return cfg


def hub_recipe(
    checkpoint_dir: str,
    out_dir: str,
    *,
    micro_batch_size: int,
    epochs: int,
    global_batch_size: int = 8,
    lora_r: int = 32,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    all_targets: bool = False,
    lr_warmup_steps: int = 10,
    save_interval: int = 200,
    eval_interval: int = 100,
    quantize: str | None = None,
) -> ml_collections.ConfigDict:
    """A LitGPT config-hub ``finetune/<model>/lora.yaml``: bf16-true, Alpaca2k, sequences of 512, AdamW 2e-4.

    ``all_targets`` puts LoRA on every linear layer (query, key, value, projection, mlp, head);
    otherwise on query and value only. Defaults are those of the query/value recipes.
    ``quantize`` (e.g. "bnb.nf4"): a config hub ``qlora.yaml`` (the frozen base quantized).
    """
    cfg = base_config()
    cfg.checkpoint_dir = checkpoint_dir
    cfg.out_dir = out_dir
    cfg.precision = "bf16-true"
    cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout = lora_r, lora_alpha, lora_dropout
    cfg.quantize = quantize
    for target in LORA_TARGETS:
        cfg[target] = all_targets or target in ("lora_query", "lora_value")
    cfg.data.name = "alpaca2k"
    cfg.data.val_split_fraction = 0.03847
    cfg.data.prompt_style = "alpaca"
    cfg.train.update(save_interval=save_interval, global_batch_size=global_batch_size,
                     micro_batch_size=micro_batch_size, lr_warmup_steps=lr_warmup_steps, epochs=epochs,
                     max_seq_length=512)
    cfg.eval.interval = eval_interval
    return cfg


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """The config of ``path`` (a .py file with ``get_config()``; None: ``base_config()``) with overrides.

    Each override is ``key=value`` or ``--config.key=value`` (e.g. ``train.micro_batch_size=2``).
    """
    cfg = base_config() if path is None else _config_from_file(Path(path))
    return apply_overrides(cfg, overrides)


def _config_from_file(path: Path) -> ml_collections.ConfigDict:
    if not path.is_file():
        raise ConfigError(f"the config file {path} does not exist; pass --config=configs/finetune/<model>/lora.py")
    spec = importlib.util.spec_from_file_location(f"jaxlora_config_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"the config file {path} defines no get_config() function")
    cfg = module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() in {path} returned a {type(cfg).__name__}, not an ml_collections.ConfigDict")
    return cfg


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Set ``key=value`` overrides in place, each value parsed as its field's type; returns ``cfg``."""
    for item in overrides:
        key, sep, text = item.removeprefix("--config.").partition("=")
        if not sep:
            raise ConfigError(f"the override {item!r} has no value; write --config.{key}=VALUE")
        parent, name = _field(cfg, key)
        parent[name] = _parse_value(key, text, parent.get_type(name), _nullable(parent, name))
    return cfg


def flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    """Every leaf key of ``cfg`` in dotted form (``train.micro_batch_size``)."""
    for name, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from flat_keys(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def _field(cfg: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """(the ConfigDict holding the leaf ``key``, its last name); ConfigError for an unknown key."""
    *path, name = key.split(".")
    node = cfg
    for part in path:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        matches = difflib.get_close_matches(key, list(flat_keys(cfg)), n=1, cutoff=0.6)
        hint = f"; did you mean {matches[0]!r}?" if matches else "; see `jaxlora finetune --help` for the keys"
        raise ConfigError(f"unknown config key {key!r}{hint}")
    if isinstance(node[name], ml_collections.ConfigDict):
        example = next(iter(node[name].keys()), "...")
        raise ConfigError(f"{key!r} is a group of settings, not one; set its fields, "
                          f"e.g. --config.{key}.{example}=VALUE")
    return node, name


def _nullable(parent: ml_collections.ConfigDict, name: str) -> bool:
    # ml_collections offers no public test for a typed reference (get_ref() would create one).
    return parent[name] is None or isinstance(parent._fields[name], FieldReference)  # noqa: SLF001


_NONE = ("none", "null")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _parse_value(key: str, text: str, field_type: type, nullable: bool) -> Any:
    """``text`` as a value of ``field_type`` (None for none/null where the field allows it)."""
    word = text.strip().lower()
    if word in _NONE:
        if not nullable:
            raise ConfigError(f"{key} cannot be None; give it a value of type {field_type.__name__}")
        return None
    if field_type is bool:
        if word not in _TRUE + _FALSE:
            raise ConfigError(f"{key} takes true or false, got {text!r}")
        return word in _TRUE
    if field_type in (int, float):
        try:
            return field_type(text)
        except ValueError:
            kind = "an integer" if field_type is int else "a number"
            raise ConfigError(f"{key} takes {kind}, got {text!r}") from None
    if field_type is tuple:
        value = _literal(text)
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{key} takes a tuple such as (0.9,0.95), got {text!r}")
        return tuple(value)
    if field_type is str:
        return text
    return _guess(text)  # an untyped field (object, or a plain field holding None)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _guess(text: str) -> Any:
    word = text.strip().lower()
    if word in ("true", "false"):
        return word == "true"
    value = _literal(text)
    return value if isinstance(value, (int, float, tuple, list)) else text


# ---------------------------------------------------------------------------------------------
# Validation


def validate(
    cfg: ml_collections.ConfigDict,
    data_parallel_size: int = 1,
    *,
    backend_supports_bf16: bool = True,
    model_block_size: int | None = None,
) -> None:
    """Raise ConfigError (one sentence: the offending values and the fix) for a bad config.

    data_parallel_size: the mesh's data-parallel size, which the global batch is split over.
    backend_supports_bf16: False where bf16 cannot run; the caller decides (slow bf16 is not absent bf16).
    model_block_size: the model's context length, which ``train.max_seq_length`` may not exceed.
    """
    _check_checkpoint_dir(cfg.checkpoint_dir)
    _check_precision(cfg.precision, backend_supports_bf16)
    _check_lora(cfg)
    _check_optimizer(cfg.optimizer, cfg.train.min_lr)
    _check_train(cfg.train, model_block_size)
    accumulation_steps(cfg, data_parallel_size)
    _check_eval(cfg.eval, cfg.train.save_interval)
    if cfg.eval.exact_match and not cfg.data.mask_prompt:
        raise ConfigError("eval.exact_match scores the labelled tokens, which are the whole prompt unless "
                          "data.mask_prompt=True; set --config.data.mask_prompt=True")
    _check_data(cfg.data)
    _one_of("model.attention_impl", cfg.model.attention_impl, ATTENTION_IMPLS)
    _one_of("model.moe_dispatch", cfg.model.moe_dispatch, MOE_DISPATCH)
    _check_checkpointing(cfg.checkpoint)
    _check_mesh(cfg.mesh)
    _check_distributed(cfg.distributed)


# Fields a resumed run may change: they touch neither the saved state nor the data stream nor the math of the
# steps to come (a longer run lengthens the lr schedule; another mesh gives fp-close, not bitwise, steps).
RESUME_SAFE = ("out_dir", "resume", "train.save_interval", "train.log_interval", "train.max_time", "train.epochs",
               "train.max_steps", "train.remat", "eval.", "logger.", "checkpoint.", "mesh.", "distributed.",
               "data.download_dir", "model.attention_impl", "model.moe_dispatch")
_PATHS = ("checkpoint_dir", "data.json_path")  # compared as the files they name


def resume_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """The fields where `current` (a run config as JSON) differs from `saved` (the config stored with the
    checkpoint being resumed), as "key old -> new": (those that make the resume unusable or inexact, safe ones)."""
    old, new = _flat(saved), _flat(current)
    # with "scan" accumulation the step's gradient is that of the whole global batch however it is split into
    # micro-batches (fp-close, as across meshes); "multisteps" averages per micro-batch, so the split matters
    scan = old.get("train.grad_accumulation") == new.get("train.grad_accumulation") == "scan"
    unsafe, safe = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key in _PATHS and isinstance(a, str) and isinstance(b, str):
            a, b = (str(Path(x).resolve()) for x in (a, b))
        if a == b:
            continue
        change = f"{key} {old.get(key)!r} -> {new.get(key)!r}"
        ok = any(key == f or (f.endswith(".") and key.startswith(f)) for f in RESUME_SAFE)
        (safe if ok or (scan and key == "train.micro_batch_size") else unsafe).append(change)
    return unsafe, safe


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = tuple(value) if isinstance(value, list) else value
    return out


def accumulation_steps(cfg: ml_collections.ConfigDict, data_parallel_size: int = 1) -> int:
    """Micro-batches per optimizer step: global_batch_size / (data_parallel_size * micro_batch_size)."""
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    _positive_int("train.global_batch_size", gbs)
    _positive_int("train.micro_batch_size", mbs)
    _positive_int("data_parallel_size", data_parallel_size)
    per_step = data_parallel_size * mbs
    if gbs % per_step == 0:
        return gbs // per_step
    lower, upper = (gbs // per_step) * per_step, (gbs // per_step + 1) * per_step
    fixes = " or ".join(str(g) for g in (lower, upper) if g > 0)
    fix = f"set train.global_batch_size to {fixes}"
    if gbs % data_parallel_size == 0:
        per_device = gbs // data_parallel_size
        divisors = [m for m in range(1, per_device + 1) if per_device % m == 0]
        nearest = min(divisors, key=lambda m: (abs(m - mbs), -m))
        fix += f", or train.micro_batch_size to {nearest} (a divisor of {per_device})"
    dp = f"data-parallel size {data_parallel_size} x " if data_parallel_size > 1 else ""
    raise ConfigError(
        f"train.global_batch_size={gbs} is not a multiple of {dp}train.micro_batch_size={mbs} = {per_step}, "
        f"so the accumulation steps are not a whole number; {fix}"
    )


def _check_checkpoint_dir(checkpoint_dir: str | None) -> None:
    if checkpoint_dir is None:
        raise ConfigError("checkpoint_dir is not set; pass --config.checkpoint_dir=DIR, a directory "
                          "with the model's config.json, *.safetensors and tokenizer")
    if storage.is_url(checkpoint_dir):  # mirrored when first read (storage.local_checkpoint), which checks it
        storage.check_available(checkpoint_dir)
    elif not Path(checkpoint_dir).is_dir():
        raise ConfigError(f"checkpoint_dir {checkpoint_dir} does not exist; download the model there "
                          f"or point --config.checkpoint_dir at the directory that holds it")


def _check_precision(precision: str | None, backend_supports_bf16: bool) -> None:
    if precision is None:
        return
    _one_of("precision", precision, tuple(POLICIES))
    if precision.startswith("bf16") and not backend_supports_bf16:
        raise ConfigError(f"precision {precision!r} needs bfloat16, which this backend lacks; "
                          f"set --config.precision=16-mixed (GPU) or 32-true")


def _check_lora(cfg: ml_collections.ConfigDict) -> None:
    if not isinstance(cfg.lora_r, int) or cfg.lora_r < 0:
        raise ConfigError(f"lora_r must be an integer >= 0, got {cfg.lora_r}")
    if not cfg.lora_alpha > 0:
        raise ConfigError(f"lora_alpha must be > 0, got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    pattern = cfg.lora_rank_pattern
    if pattern is not None and not (isinstance(pattern, dict) and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in pattern.items())):
        raise ConfigError(f"lora_rank_pattern must be a dict of regex -> integer rank, got {pattern!r}")
    if cfg.lora_r > 0 and cfg.lora_targets is None and not any(cfg[target] for target in LORA_TARGETS):
        raise ConfigError(f"lora_r is {cfg.lora_r} but every LoRA target is off, so nothing would train; "
                          f"set at least one of {', '.join(LORA_TARGETS)} to true, or lora_targets")
    lora_config(cfg)  # the patterns compile, the ranks are positive
    quant.resolve(cfg.quantize)


def lora_config(cfg: ml_collections.ConfigDict) -> lora.LoRAConfig:
    """The `LoRAConfig` of a (validated) run config."""
    return lora.LoRAConfig(
        r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
        target_pattern=cfg.lora_targets, rank_pattern=tuple((cfg.lora_rank_pattern or {}).items()),
        **{target.removeprefix("lora_"): cfg[target] for target in LORA_TARGETS})


def _check_optimizer(opt: ml_collections.ConfigDict, min_lr: float) -> None:
    _one_of("optimizer.name", opt.name.lower(), OPTIMIZERS)
    if not opt.lr > 0:
        raise ConfigError(f"optimizer.lr must be > 0, got {opt.lr}")
    if not 0 <= min_lr <= opt.lr:
        raise ConfigError(f"train.min_lr={min_lr} must be in [0, optimizer.lr={opt.lr}]; lower train.min_lr")
    if opt.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay must be >= 0, got {opt.weight_decay}")
    if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
        raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {opt.betas}")
    if not opt.eps > 0:
        raise ConfigError(f"optimizer.eps must be > 0, got {opt.eps}")
    if opt.momentum < 0:
        raise ConfigError(f"optimizer.momentum must be >= 0, got {opt.momentum}")
    if opt.lora_plus_ratio is not None and not opt.lora_plus_ratio > 0:
        raise ConfigError(f"optimizer.lora_plus_ratio must be > 0 (LoRA+ uses about 16; None: plain LoRA), "
                          f"got {opt.lora_plus_ratio}")


def _check_train(train: ml_collections.ConfigDict, model_block_size: int | None) -> None:
    if train.epochs is not None and train.max_steps is not None:
        raise ConfigError(f"train.epochs={train.epochs} and train.max_steps={train.max_steps} are both set; keep one, "
                          f"e.g. --config.train.epochs=None to stop after {train.max_steps} optimizer steps")
    if train.epochs is None and train.max_steps is None:
        raise ConfigError("train.epochs and train.max_steps are both None, so the run has no end; set one, "
                          "e.g. --config.train.epochs=1 or --config.train.max_steps=100")
    for key in ("epochs", "max_steps", "save_interval", "log_interval", "max_seq_length"):
        if train[key] is not None:
            _positive_int(f"train.{key}", train[key])
    if train.max_time is not None and not train.max_time > 0:
        raise ConfigError(f"train.max_time must be > 0 seconds or None, got {train.max_time}")
    if train.max_norm is not None and not train.max_norm > 0:
        raise ConfigError(f"train.max_norm must be > 0 or None (no clipping), got {train.max_norm}")
    if not isinstance(train.router_aux_loss_coef, (int, float)) or not train.router_aux_loss_coef >= 0:
        raise ConfigError(f"train.router_aux_loss_coef must be a number >= 0 (0: off), got {train.router_aux_loss_coef}")
    if train.lr_warmup_steps is not None and train.lr_warmup_fraction is not None:
        raise ConfigError(
            f"train.lr_warmup_steps={train.lr_warmup_steps} and train.lr_warmup_fraction={train.lr_warmup_fraction} "
            f"are both set; keep one, e.g. --config.train.lr_warmup_steps=None to warm up by fraction"
        )
    if train.lr_warmup_steps is not None and (not isinstance(train.lr_warmup_steps, int) or train.lr_warmup_steps < 0):
        raise ConfigError(f"train.lr_warmup_steps must be an integer >= 0, got {train.lr_warmup_steps}")
    if train.lr_warmup_fraction is not None and not 0 <= train.lr_warmup_fraction <= 1:
        raise ConfigError(f"train.lr_warmup_fraction must be in [0, 1], got {train.lr_warmup_fraction}")
    if model_block_size is not None and train.max_seq_length is not None and train.max_seq_length > model_block_size:
        raise ConfigError(
            f"train.max_seq_length={train.max_seq_length} exceeds the model's context of {model_block_size} "
            f"tokens; set --config.train.max_seq_length={model_block_size} or less"
        )
    _one_of("train.grad_accumulation", train.grad_accumulation, MODES)
    _one_of("train.remat", train.remat, REMAT_CHOICES)


def _check_eval(ev: ml_collections.ConfigDict, save_interval: int) -> None:
    _positive_int("eval.interval", ev.interval)
    _positive_int("eval.max_iters", ev.max_iters)
    if ev.max_new_tokens is not None and (not isinstance(ev.max_new_tokens, int) or ev.max_new_tokens < 0):
        raise ConfigError(f"eval.max_new_tokens must be an integer >= 0 or None, got {ev.max_new_tokens}")
    if save_interval % ev.interval:
        lower = max(ev.interval, save_interval // ev.interval * ev.interval)
        upper = lower + ev.interval
        nearest_save = lower if save_interval - lower <= upper - save_interval else upper
        nearest_eval = max(d for d in range(1, ev.interval + 1) if save_interval % d == 0)
        raise ConfigError(
            f"train.save_interval={save_interval} is not a multiple of eval.interval={ev.interval}, so a saved "
            f"step would lack a validation loss; set train.save_interval to {nearest_save} "
            f"or eval.interval to {nearest_eval}"
        )


def _check_data(data: ml_collections.ConfigDict) -> None:
    if data.val_split_fraction is not None and not 0 < data.val_split_fraction < 1:
        raise ConfigError(f"data.val_split_fraction must be in (0, 1), got {data.val_split_fraction}")
    if data.length_bucket is not None:
        _positive_int("data.length_bucket", data.length_bucket)
    if not isinstance(data.ignore_index, int) or data.ignore_index >= 0:
        raise ConfigError(f"data.ignore_index must be a negative integer (labels >= 0 are token ids), got "
                          f"{data.ignore_index}")


def _check_checkpointing(ckpt: ml_collections.ConfigDict) -> None:
    if ckpt.max_to_keep is not None:
        _positive_int("checkpoint.max_to_keep", ckpt.max_to_keep)
    if not isinstance(ckpt.keep_best, int) or ckpt.keep_best < 0:
        raise ConfigError(f"checkpoint.keep_best must be an integer >= 0, got {ckpt.keep_best}")


def _check_mesh(mesh: ml_collections.ConfigDict) -> None:
    for axis in MESH_AXES:
        size = mesh[axis]
        if not isinstance(size, int) or isinstance(size, bool) or not (size >= 1 or size == -1):
            raise ConfigError(f"mesh.{axis} must be a positive integer or -1 (the remaining devices), got {size}")
    fills = [axis for axis in MESH_AXES if mesh[axis] == -1]
    if len(fills) > 1:
        raise ConfigError(f"mesh.{' and mesh.'.join(fills)} are all -1; at most one mesh axis may take the "
                          f"remaining devices, give the others a size")


def _check_distributed(dist: ml_collections.ConfigDict) -> None:
    if dist.num_processes is not None:
        _positive_int("distributed.num_processes", dist.num_processes)
    if dist.process_id is not None and dist.num_processes is not None and not 0 <= dist.process_id < dist.num_processes:
        raise ConfigError(f"distributed.process_id={dist.process_id} must be in [0, distributed.num_processes="
                          f"{dist.num_processes})")


def _positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value}")


def _one_of(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        matches = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {matches[0]!r}?)" if matches else ""
        raise ConfigError(f"unknown {key} {value!r}{hint}; choose one of {', '.join(choices)}")
