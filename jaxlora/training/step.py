"""Loss, train step (gradient accumulation) and eval step, as pure functions under `jax.jit`.

The model travels as `(graphdef, lora, base)` (see `models.lora.split_lora`) and is rebuilt with
`nnx.merge` inside the jitted function. Only `lora` is differentiated and updated; `base` is an
argument of every call (never donated, never closed over, never differentiated).

Loss: next-token cross-entropy in fp32, labels aligned with input_ids as in LitGPT (position i
predicts labels[i + 1]), negative labels excluded (any `data.ignore_index`, which must be negative,
and IGNORE_INDEX, which pads here), logits beyond the tokenizer's
vocab_size (padding columns) excluded from the softmax. It is computed in chunks of the sequence,
each chunk's gradients computed with its loss (`cross_entropy_sum`), so the [batch, seq, vocab]
logits never exist at once: only one [batch, chunk, vocab] slice at a time.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxlora.errors import ConfigError
from jaxlora.training.sharding import activation_sharding

IGNORE_INDEX = -100  # the label of positions without a target that this module adds; any negative label is one
DEFAULT_CHUNK_SIZE = 128  # sequence positions per loss chunk (LitGPT's lm_head_chunk_size)
MODES = ("scan", "multisteps")


@flax.struct.dataclass
class TrainState:
    """What an optimizer step changes. `lora` is a plain nested dict of fp32 arrays."""

    step: jax.Array  # int32 []: optimizer steps taken
    lora: Any
    opt_state: Any


def init_train_state(lora_params, optimizer: optax.GradientTransformation) -> TrainState:
    """lora_params: the `nnx.State` from `split_lora` (or its pure dict). The state gets its own copy
    of the arrays: train steps donate the state, which must not delete the caller's arrays."""
    lora = nnx.to_pure_dict(lora_params) if isinstance(lora_params, nnx.State) else lora_params
    lora = jax.tree.map(jnp.copy, lora)
    return TrainState(step=jnp.zeros((), jnp.int32), lora=lora, opt_state=optimizer.init(lora))


def cross_entropy_sum(logits_fn: Callable[[Any, jax.Array], jax.Array], head_params, hidden: jax.Array,
                      targets: jax.Array, *, vocab_size: int,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[jax.Array, jax.Array]:
    """Sum of token cross-entropies and count of non-ignored targets, chunked over the sequence.

    logits_fn(head_params, h [b, c, d]) -> fp32 [b, c, padded_vocab] (`GPT.logits_head`), holding no
    arrays of its own: everything the logits depend on is in `head_params`, which is differentiable.
    hidden: [b, t, d] (any dtype); targets: int [b, t], negative where no loss.
    Returns (fp32 [], int32 []).

    Differentiated, each chunk's forward pass also computes its gradients (of the hidden states, and
    of whichever head params are being differentiated, summed over chunks in fp32), so the backward
    pass only scales them: one head product per chunk for the logits and one per gradient, never the
    logits of two chunks at once, and none recomputed.
    """
    leaves, treedef = jax.tree.flatten(head_params)
    dtypes = [leaf.dtype for leaf in leaves]

    def chunk_logits(leaves, h):
        logits = logits_fn(jax.tree.unflatten(treedef, leaves), h).astype(jnp.float32)  # [b, c, V]
        if logits.shape[-1] > vocab_size:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
        return logits

    def chunk_loss(logits, y):
        """-> (loss sum, count, log-sum-exp [b, c], valid [b, c], targets made safe to index with)."""
        valid = y >= 0
        y = jnp.where(valid, y, 0)
        target_logit = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        lse = jax.nn.logsumexp(logits, axis=-1)
        return jnp.sum(jnp.where(valid, lse - target_logit, 0.0)), jnp.sum(valid, dtype=jnp.int32), lse, valid, y

    def total(leaves, hidden, targets):
        def body(carry, xs):
            h, y = xs
            loss, count = chunk_loss(chunk_logits(leaves, h), y)[:2]
            return (carry[0] + loss, carry[1] + count), None

        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        return jax.lax.scan(body, init, _chunks(hidden, targets, chunk_size))[0]

    @jax.custom_vjp
    def fused(leaves, hidden, targets):
        return total(leaves, hidden, targets)

    def fwd(leaves, hidden, targets):
        perturbed = [leaf.perturbed for leaf in leaves]
        values = [leaf.value for leaf in leaves]
        h, y = hidden.value, targets.value
        wrt = [v for v, p in zip(values, perturbed) if p]  # the head params being differentiated

        def logits_of(wrt, h):
            it = iter(wrt)
            return chunk_logits([next(it) if p else v for v, p in zip(values, perturbed)], h)

        def body(carry, xs):
            loss, count, grads = carry
            h, y = xs
            logits, head_vjp = jax.vjp(logits_of, wrt, h)
            chunk, chunk_count, lse, valid, y = chunk_loss(logits, y)
            # d loss / d logits = softmax - one_hot(target), on the rows with a target
            d_logits = jnp.exp(logits - lse[..., None]) - jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)
            d_wrt, dh = head_vjp(jnp.where(valid[..., None], d_logits, 0.0))
            grads = [g + dw.astype(jnp.float32) for g, dw in zip(grads, d_wrt)]
            return (loss + chunk, count + chunk_count, grads), dh if hidden.perturbed else None

        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), [jnp.zeros(w.shape, jnp.float32) for w in wrt])
        (loss, count, grads), dh = jax.lax.scan(body, init, _chunks(h, y, chunk_size))
        if hidden.perturbed:
            b, t, d = h.shape
            dh = dh.swapaxes(0, 1).reshape(b, -1, d)[:, :t]  # [n, b, c, d] -> [b, t, d] (chunk padding dropped)
        it = iter(grads)
        return (loss, count), ([next(it) if p else None for p in perturbed], dh)

    def bwd(saved, cotangents):
        grads, dh = saved  # fp32 per head param (None: not differentiated); dh [b, t, d] or None
        g = cotangents[0]  # fp32 []: the loss sum's cotangent (the count's is zero)
        d_leaves = [None if dw is None else (dw * g).astype(dtype) for dw, dtype in zip(grads, dtypes)]
        return d_leaves, None if dh is None else (dh * g).astype(dh.dtype), None

    fused.defvjp(fwd, bwd, symbolic_zeros=True)
    return fused(leaves, hidden, targets)


def sequence_loss(model, input_ids: jax.Array, labels: jax.Array, *, segment_ids: jax.Array | None = None,
                  dropout_key: jax.Array | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  mesh: Mesh | None = None, router_aux: bool = False):
    """input_ids, labels int32 [b, t] -> (loss sum fp32 [], token count int32 []); with `router_aux`, also the
    MoE load-balancing loss of the batch's routing (fp32 [], `GPT.hidden_states`; 0 without experts).

    Position i predicts labels[:, i + 1]; the last position predicts nothing. segment_ids: packed
    rows (`GPT.hidden_states`; each segment's first label is ignore_index, so no segment predicts
    the next one's first token). mesh: keep the activations' batch axis split over the mesh's batch
    axes (see `sharding.activation_sharding`).
    """
    logits_fn, head_params, hidden, targets, aux = _predict(model, input_ids, labels, segment_ids, dropout_key, mesh,
                                                            router_aux)
    loss_sum, count = cross_entropy_sum(logits_fn, head_params, hidden, targets, vocab_size=model.config.vocab_size,
                                        chunk_size=chunk_size)
    return (loss_sum, count, aux) if router_aux else (loss_sum, count)


def _predict(model, input_ids, labels, segment_ids, dropout_key, mesh, router_aux=False):
    """-> (logits_fn, head_params (`GPT.logits_head`), final hidden states [b, t, d], targets [b, t]:
    labels shifted left by one, the router load-balancing loss or None)."""
    batch_sharding = None if mesh is None else activation_sharding(mesh)
    hidden = model.hidden_states(input_ids, segment_ids=segment_ids, dropout_key=dropout_key,
                                 batch_sharding=batch_sharding, router_aux=router_aux)
    hidden, aux = hidden if router_aux else (hidden, None)
    logits_fn, head_params = model.logits_head()
    if batch_sharding is not None:
        head = logits_fn
        logits_fn = lambda p, h: head(p, jax.lax.with_sharding_constraint(h, batch_sharding))  # noqa: E731
    targets = jnp.concatenate([labels[:, 1:], jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)], axis=1)
    return logits_fn, head_params, hidden, targets, aux


def _chunks(hidden: jax.Array, targets: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """hidden [b, t, d], targets [b, t] -> [n, b, c, d], [n, b, c] (t padded to n * c with IGNORE_INDEX)."""
    b, t, d = hidden.shape
    c = min(chunk_size, t)
    n = math.ceil(t / c)
    if n * c != t:
        hidden = jnp.pad(hidden, ((0, 0), (0, n * c - t), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, n * c - t)), constant_values=IGNORE_INDEX)
    # the batch axis keeps its sharding
    return hidden.reshape(b, n, c, d).swapaxes(0, 1), targets.reshape(b, n, c).swapaxes(0, 1)


def token_mistakes(logits_fn: Callable[[Any, jax.Array], jax.Array], head_params, hidden: jax.Array,
                   targets: jax.Array, *,
                   vocab_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """int32 [b]: per row, the non-ignored targets that are not the argmax of their logits (over the
    first `vocab_size` columns), chunked over the sequence like `cross_entropy_sum`."""
    hs, ys = _chunks(hidden, targets, chunk_size)

    def body(mistakes, xs):
        h, y = xs
        predicted = jnp.argmax(logits_fn(head_params, h)[..., :vocab_size], axis=-1)
        return mistakes + jnp.sum((y >= 0) & (predicted != y), axis=1, dtype=jnp.int32), None

    mistakes, _ = jax.lax.scan(body, jnp.zeros(hidden.shape[0], jnp.int32), (hs, ys))
    return mistakes


def sequence_eval(model, input_ids: jax.Array, labels: jax.Array, *, segment_ids: jax.Array | None = None,
                  chunk_size: int = DEFAULT_CHUNK_SIZE,
                  mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """-> (loss sum fp32 [], token count, exact rows, scored rows) (int32 []), as `sequence_loss` without dropout.

    Teacher-forced exact match: a row with labelled targets is exact when every one of them is the
    argmax given the true prefix, which is exactly when greedy decoding from the unlabelled prefix
    reproduces them (with masked prompts: the response and its EOS). Rows without targets (batch
    padding) are not scored.
    """
    logits_fn, head_params, hidden, targets, _ = _predict(model, input_ids, labels, segment_ids, None, mesh)
    loss_sum, count = cross_entropy_sum(logits_fn, head_params, hidden, targets, vocab_size=model.config.vocab_size,
                                        chunk_size=chunk_size)
    mistakes = token_mistakes(logits_fn, head_params, hidden, targets, vocab_size=model.config.vocab_size,
                              chunk_size=chunk_size)
    scored = jnp.any(targets >= 0, axis=1)
    return loss_sum, count, jnp.sum(scored & (mistakes == 0), dtype=jnp.int32), jnp.sum(scored, dtype=jnp.int32)


def _loss_fn(graphdef, chunk_size: int, mesh: Mesh | None, router_aux_coef: float = 0.0):
    """loss(lora, base, batch, key) -> (objective, (loss sum, token count, router aux x token count)) of one
    micro-batch {"input_ids", "labels"[, "segment_ids"]} (`sequence_loss`). The objective, which is
    differentiated, is the loss sum plus router_aux_coef x the load-balancing loss x the token count: a
    micro-batch's mean loss plus coef x aux, as transformers' MoE loss with output_router_logits."""
    def loss(lora, base, batch, key):
        model = nnx.merge(graphdef, lora, base)
        loss_sum, count, *aux = sequence_loss(
            model, batch["input_ids"], batch["labels"], segment_ids=batch.get("segment_ids"), dropout_key=key,
            chunk_size=chunk_size, mesh=mesh, router_aux=router_aux_coef > 0)
        weighted_aux = aux[0] * count if aux else jnp.zeros((), jnp.float32)
        return loss_sum + router_aux_coef * weighted_aux, (loss_sum, count, weighted_aux)
    return loss


def make_train_step(graphdef, optimizer: optax.GradientTransformation, *, accum_steps: int, mode: str = "scan",
                    chunk_size: int = DEFAULT_CHUNK_SIZE, state_sharding: TrainState | None = None,
                    router_aux_loss_coef: float = 0.0):
    """-> train_step(state, base, batch, key) -> (state, metrics); `state` is donated.

    state_sharding: the train state's shardings (`sharding.train_state_shardings`), kept by every
      step; its mesh also pins the activations' batch axis to the batch axes, so frozen weights
      sharded over fsdp are gathered where used, one layer's (or the embedding's) at a time, in
      the forward and again in the backward pass of each micro-batch (ZeRO-3), never the whole
      model. None: XLA places outputs and activations (fine on one device or replicated params).

    batch: {"input_ids", "labels"[, "segment_ids" (packed rows)]} int32 [accum_steps, micro_batch, seq]
      (micro_batch: global).
    key: the run's base dropout key; micro-batch i of optimizer step s uses
      fold_in(fold_in(key, s), i), so a resumed run draws the same dropout masks.
    metrics: loss (fp32, token-weighted mean over the step's batch), grad_norm (fp32, global norm
      of the gradient before clipping), tokens (int32, count of non-ignored targets); with
      router_aux_loss_coef > 0 (MoE: the load-balancing loss, times the coefficient, is trained on) also
      router_aux_loss (fp32, its token-weighted mean over the micro-batches; not part of `loss`).

    mode "scan": one jitted call; `lax.scan` over the micro-batches sums token-loss sums, token
      counts and fp32 gradients, and divides once by the step's token count: the gradient equals
      that of one big batch whatever the padding.
    mode "multisteps": `optimizer` must be `make_optimizer(..., multisteps=accum_steps)`. One jitted
      call per micro-batch (a Python loop here); optax.MultiSteps averages the per-micro-batch mean
      gradients (a mean of means). It equals "scan" only when every micro-batch has the same
      token count; otherwise micro-batches with fewer tokens weigh more per token. optax runs the
      inner update on every call and keeps it on the last; `state.step` counts optimizer steps.
    """
    if accum_steps < 1:
        raise ConfigError(f"accumulation steps must be >= 1, got {accum_steps}")
    mesh = None if state_sharding is None else state_sharding.step.mesh
    jit = functools.partial(jax.jit, donate_argnums=0)
    if state_sharding is not None:
        jit = functools.partial(jit, out_shardings=(state_sharding, state_sharding.step))  # metrics replicated
    loss_fn = _loss_fn(graphdef, chunk_size, mesh, router_aux_loss_coef)
    if mode == "scan":
        return _scan_step(loss_fn, optimizer, accum_steps, jit, router_aux_loss_coef > 0)
    if mode == "multisteps":
        return _multisteps_step(loss_fn, optimizer, accum_steps, jit, router_aux_loss_coef > 0)
    raise ConfigError(f"unknown grad_accumulation mode {mode!r}; choose one of {', '.join(MODES)}")


def _scan_step(loss_fn, optimizer, accum_steps, jit, report_aux):
    @jit
    def train_step(state: TrainState, base, batch, key):
        ids = batch["input_ids"]
        if ids.shape[0] != accum_steps:
            raise ValueError(f"batch has {ids.shape[0]} micro-batches, the step was built for {accum_steps}")
        # Differentiate loss_sum / positions (a static constant) so gradients keep a mean-like scale
        # (safe in fp16); rescale by positions / tokens once at the end.
        positions = ids.shape[0] * ids.shape[1] * ids.shape[2]
        step_key = jax.random.fold_in(key, state.step)

        def scaled_loss(lora, batch_i, key_i):
            objective, parts = loss_fn(lora, base, batch_i, key_i)
            return objective / positions, parts

        def micro(carry, xs):
            i, batch_i = xs
            (_, parts), grads = jax.value_and_grad(scaled_loss, has_aux=True)(
                state.lora, batch_i, jax.random.fold_in(step_key, i))
            sums = tuple(a + p for a, p in zip(carry[0], parts))
            return (sums, jax.tree.map(lambda a, g: a + g.astype(jnp.float32), carry[1], grads)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.lora)
        init = ((jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)), zeros)
        ((loss_sum, count, aux_sum), grads), _ = jax.lax.scan(micro, init, (jnp.arange(accum_steps), batch))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g * (positions / denom), grads)
        new_state = _apply(optimizer, state, grads, state.step + 1)
        metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads), "tokens": count}
        if report_aux:
            metrics["router_aux_loss"] = aux_sum / denom
        return new_state, metrics

    return train_step


def _apply(optimizer, state: TrainState, grads, step) -> TrainState:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
    return TrainState(step=step, lora=optax.apply_updates(state.lora, updates), opt_state=opt_state)


def _multisteps_step(loss_fn, optimizer, accum_steps, jit, report_aux):
    @jit
    def micro_step(state: TrainState, base, batch, key):
        if not isinstance(state.opt_state, optax.MultiStepsState):
            raise ConfigError("grad_accumulation 'multisteps' needs an optimizer built with multisteps=accum_steps")
        i = state.opt_state.mini_step  # which micro-batch of `batch` this call trains on
        batch_i = {k: jax.lax.dynamic_index_in_dim(v, i, keepdims=False) for k, v in batch.items()}
        key_i = jax.random.fold_in(jax.random.fold_in(key, state.step), i)

        def mean_loss(lora):
            objective, parts = loss_fn(lora, base, batch_i, key_i)
            return objective / jnp.maximum(parts[1], 1), parts

        (_, (loss_sum, count, aux_sum)), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.lora)
        # MultiSteps keeps a running mean (Welford); this is the mean it will apply after the last micro-batch.
        mean_grads = jax.tree.map(lambda acc, g: acc + (g - acc) / (i + 1), state.opt_state.acc_grads, grads)
        new_state = _apply(optimizer, state, grads, state.step)
        new_state = new_state.replace(step=state.step + (new_state.opt_state.mini_step == 0))
        return new_state, {"loss_sum": loss_sum, "aux_sum": aux_sum, "tokens": count,
                           "grad_norm": optax.tree.norm(mean_grads)}

    def train_step(state: TrainState, base, batch, key):
        if batch["input_ids"].shape[0] != accum_steps:
            raise ValueError(f"batch has {batch['input_ids'].shape[0]} micro-batches, the step was built for "
                             f"{accum_steps}")
        loss_sum, aux_sum, tokens = 0.0, 0.0, 0
        for _ in range(accum_steps):
            state, m = micro_step(state, base, batch, key)
            loss_sum, aux_sum, tokens = loss_sum + m["loss_sum"], aux_sum + m["aux_sum"], tokens + m["tokens"]
        denom = jnp.maximum(tokens, 1)
        metrics = {"loss": loss_sum / denom, "grad_norm": m["grad_norm"], "tokens": tokens}
        if report_aux:
            metrics["router_aux_loss"] = aux_sum / denom
        return state, metrics

    train_step.micro_step = micro_step
    return train_step


def make_eval_step(graphdef, *, chunk_size: int = DEFAULT_CHUNK_SIZE, mesh: Mesh | None = None,
                   exact_match: bool = False):
    """-> eval_step(lora, base, batch) -> (loss sum fp32 [], token count int32 []); no dropout.

    batch: {"input_ids", "labels"[, "segment_ids"]} int32 [micro_batch, seq]. mesh: as in `make_train_step`.
    exact_match: also return (exact rows, scored rows) int32 [] (see `sequence_eval`).
    """
    loss_fn = _loss_fn(graphdef, chunk_size, mesh)

    @jax.jit
    def eval_step(lora, base, batch):
        if exact_match:
            return sequence_eval(nnx.merge(graphdef, lora, base), batch["input_ids"], batch["labels"],
                                 segment_ids=batch.get("segment_ids"), chunk_size=chunk_size, mesh=mesh)
        return loss_fn(lora, base, batch, None)[1][:2]

    return eval_step
