"""Full-parameter pretraining of the demo's small Llama with the project's own `GPT` (fp32, AdamW).

Documents are tokenized as `<s> text </s>` and packed back to back into rows of `seq_len + 1`
tokens; every token of a row is a target (no padding, no masking). All parameters train: the
model is built without LoRA and `nnx.split` gives one state, differentiated as a whole.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlora.data import Tokenizer
from jaxlora.models.config import ModelConfig
from jaxlora.models.gpt import GPT
from jaxlora.training.optim import make_optimizer
from jaxlora.training.step import sequence_loss

log = logging.getLogger(__name__)


def pack(texts: Iterable[str], tokenizer: Tokenizer, seq_len: int) -> np.ndarray:
    """int32 [rows, seq_len]: `<s> text </s>` of every text, concatenated and cut into rows (remainder dropped)."""
    ids = np.concatenate([tokenizer.encode(t, bos=True, eos=True) for t in texts])
    rows = len(ids) // seq_len
    return ids[:rows * seq_len].reshape(rows, seq_len)


def make_step(graphdef, optimizer: optax.GradientTransformation):
    """-> step(params, opt_state, ids) -> (params, opt_state, mean loss); params and opt_state donated."""

    def loss_fn(params, ids):
        loss_sum, count = sequence_loss(nnx.merge(graphdef, params), ids, ids)
        return loss_sum / count

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def pretrain(config: ModelConfig, rows: np.ndarray, *, steps: int, batch_size: int, lr: float,
             warmup: int = 50, weight_decay: float = 0.1, seed: int = 0, log_every: int = 50) -> GPT:
    """A fp32 `GPT` trained from scratch for `steps` AdamW steps on batches of `rows` (drawn in a seeded
    shuffled order, reshuffled every epoch); logs the mean loss every `log_every` steps."""
    model = GPT(config, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    optimizer, _ = make_optimizer("adamw", lr=lr, total_steps=steps, weight_decay=weight_decay, betas=(0.9, 0.95),
                                  warmup_steps=min(warmup, steps // 10), min_lr=lr / 10, max_norm=1.0)
    opt_state = optimizer.init(params)
    step = make_step(graphdef, optimizer)
    rng = np.random.default_rng(seed)
    order, cursor = rng.permutation(len(rows)), 0
    losses, t0 = [], time.perf_counter()
    for i in range(1, steps + 1):
        if cursor + batch_size > len(order):
            order, cursor = rng.permutation(len(rows)), 0
        batch = jnp.asarray(rows[order[cursor:cursor + batch_size]])
        cursor += batch_size
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(loss)
        if i % log_every == 0 or i == steps:
            mean = float(np.mean(jax.device_get(losses)))
            log.info("pretrain step %d/%d: loss %.4f, %.2f s/step", i, steps, mean, (time.perf_counter() - t0) / i)
            losses = []
    return nnx.merge(graphdef, params)
