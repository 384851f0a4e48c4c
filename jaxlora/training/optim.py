"""The optimizer: optax chain of global-norm clipping, an optimizer by name, and the LR schedule.

Schedule (per optimizer step, as LitGPT's finetune_lora): linear warmup from 0 over the warmup
steps, then cosine decay over the remaining steps. LitGPT decays to 0 and ignores `min_lr`; here
the cosine ends at `min_lr`. The first optimizer step runs at lr 0 when there is warmup (LitGPT too).

Weight decay: `adamw`, `lion`, `adafactor` decay decoupled (scaled by the lr); `adam` and `sgd`
add `weight_decay * param` to the gradient (torch.optim.Adam / SGD semantics).

LoRA+ (Hayou et al. 2024, `lora_plus_ratio`): LoRA B (and DoRA's magnitude vectors, as PEFT's
`create_loraplus_optimizer` groups 1-D params with B) learn at ratio x the lr. Every optimizer's
update is linear in its lr, so this scales those params' updates by the ratio after the optimizer.
"""

from __future__ import annotations

import math

import jax
import optax

from jaxlora.errors import ConfigError

OPTIMIZERS = ("adamw", "adam", "sgd", "lion", "adafactor")


def warmup_steps_for(total_steps: int, warmup_steps: int | None = None,
                     warmup_fraction: float | None = None) -> int:
    """Warmup length in optimizer steps: `warmup_steps`, or ceil(fraction * total), capped at total."""
    if warmup_steps is not None and warmup_fraction is not None:
        raise ConfigError("set only one of lr_warmup_steps and lr_warmup_fraction")
    if warmup_fraction is not None:
        if not 0.0 <= warmup_fraction <= 1.0:
            raise ConfigError(f"lr_warmup_fraction must be in [0, 1], got {warmup_fraction}")
        warmup_steps = math.ceil(warmup_fraction * total_steps)
    warmup_steps = warmup_steps or 0
    if warmup_steps < 0:
        raise ConfigError(f"lr_warmup_steps must be >= 0, got {warmup_steps}")
    return min(warmup_steps, total_steps)


def make_schedule(lr: float, total_steps: int, *, warmup_steps: int | None = None,
                  warmup_fraction: float | None = None, min_lr: float = 0.0) -> optax.Schedule:
    """Linear warmup 0 -> lr, then cosine lr -> min_lr ending at `total_steps`; min_lr after."""
    if total_steps < 1:
        raise ConfigError(f"the run has {total_steps} optimizer steps; it needs at least 1")
    if not 0.0 <= min_lr <= lr:
        raise ConfigError(f"min_lr must be in [0, lr={lr}], got {min_lr}")
    warmup = warmup_steps_for(total_steps, warmup_steps, warmup_fraction)
    # A run no longer than its warmup only warms up; optax needs a cosine of at least one step after it.
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=lr, warmup_steps=warmup,
                                              decay_steps=max(total_steps, warmup + 1), end_value=min_lr)


def _base_optimizer(name: str, schedule: optax.Schedule, *, weight_decay: float, betas: tuple[float, float],
                    eps: float, momentum: float, nesterov: bool) -> optax.GradientTransformation:
    b1, b2 = betas
    coupled_decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    if name == "adamw":
        return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if name == "adam":
        return optax.chain(*coupled_decay, optax.adam(schedule, b1=b1, b2=b2, eps=eps))
    if name == "sgd":
        return optax.chain(*coupled_decay, optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
    if name == "lion":
        return optax.lion(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
    if name == "adafactor":  # optax's factored second moments and update clipping; betas/eps unused
        return optax.adafactor(schedule, weight_decay_rate=weight_decay or None)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


LORA_PLUS_PARAMS = ("lora_b", "magnitude")  # the params LoRA+ speeds up, by their names in the LoRA pytree


def lora_plus(ratio: float) -> optax.GradientTransformation:
    """Scale the updates of LORA_PLUS_PARAMS by `ratio` (stateless)."""

    def update(updates, state, params=None):
        del params
        faster = lambda path, u: u * ratio if getattr(path[-1], "key", None) in LORA_PLUS_PARAMS else u  # noqa: E731
        return jax.tree_util.tree_map_with_path(faster, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(name: str = "adamw", *, lr: float, total_steps: int, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0,
                   nesterov: bool = False, warmup_steps: int | None = None, warmup_fraction: float | None = None,
                   min_lr: float = 0.0, max_norm: float | None = None, lora_plus_ratio: float | None = None,
                   multisteps: int | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """-> (optimizer, schedule). `schedule(k)` is the lr of the (k+1)-th optimizer step.

    name: one of OPTIMIZERS (case-insensitive, so LitGPT's "AdamW" works).
    max_norm: clip the gradient's global norm to this before the update (None: no clipping).
    lora_plus_ratio: LoRA+'s lr ratio of B (and DoRA magnitudes) to A (None: 1, plain LoRA).
    multisteps: wrap in `optax.MultiSteps(every_k_schedule=multisteps)`, which averages that many
      per-micro-batch mean gradients before one update (see `step.make_train_step(mode="multisteps")`).
    """
    if max_norm is not None and max_norm <= 0:
        raise ConfigError(f"max_norm must be > 0 or None, got {max_norm}")
    schedule = make_schedule(lr, total_steps, warmup_steps=warmup_steps, warmup_fraction=warmup_fraction,
                             min_lr=min_lr)
    tx = _base_optimizer(name.lower(), schedule, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                         momentum=momentum, nesterov=nesterov)
    if lora_plus_ratio is not None:
        if lora_plus_ratio <= 0:
            raise ConfigError(f"optimizer.lora_plus_ratio must be > 0 (LoRA+ papers use 16), got {lora_plus_ratio}")
        tx = optax.chain(tx, lora_plus(lora_plus_ratio))
    if max_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(max_norm), tx)
    if multisteps is not None:
        tx = optax.MultiSteps(tx, every_k_schedule=multisteps).gradient_transformation()
    return tx, schedule
