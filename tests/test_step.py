"""Loss, train step and optimizer: chunked loss vs full logits, accumulation vs one big batch,
MultiSteps vs scan, frozen params untouched, optimizer state LoRA-only, precision policies.

Everything runs in f32: equivalences are then exact up to summation order (tolerances below).
SGD is used where updates are compared, because Adam's first step is sign(g) * lr, which turns a
1e-9 gradient difference around zero into a 2 * lr parameter difference.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from _train_helpers import TINY, VOCAB, random_batch, tiny_split
from jaxlora.errors import ConfigError
from jaxlora.models.gpt import GPT
from jaxlora.models.lora import LoRAConfig, count_lora_params
from jaxlora.training.optim import OPTIMIZERS, make_optimizer, make_schedule, warmup_steps_for
from jaxlora.training.precision import POLICIES, backend_supports_bf16, resolve_precision
from jaxlora.training.step import (IGNORE_INDEX, init_train_state, make_eval_step, make_train_step,
                                   sequence_loss)

CHUNK = 8  # smaller than the sequence, and not a divisor of it in the loss test


@pytest.fixture(scope="module")
def split():
    return tiny_split(dropout=0.0)


def _as_tree(x):
    return jax.tree.map(np.asarray, jax.device_get(x))


def test_chunked_loss_and_grads_match_full_logits(split):
    graphdef, lora, base = split
    batch = random_batch(np.random.default_rng(1), (3, 20), pad_from=17)

    def chunked(lora):
        model = nnx.merge(graphdef, lora, base)
        loss, count = sequence_loss(model, batch["input_ids"], batch["labels"], chunk_size=CHUNK)
        return loss, count

    def reference(lora):
        model = nnx.merge(graphdef, lora, base)
        logits = model(batch["input_ids"])[:, :-1, :VOCAB]  # full [b, t-1, vocab] logits
        targets = batch["labels"][:, 1:]
        valid = targets != IGNORE_INDEX
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
        return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid)

    (loss, count), grads = jax.jit(jax.value_and_grad(chunked, has_aux=True))(lora)
    (ref_loss, ref_count), ref_grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(lora)
    assert int(count) == int(ref_count) == 3 * 14  # labels 3..16 of each row
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=1e-6)  # f32 sums in a different order
    eval_loss, eval_count = make_eval_step(graphdef, chunk_size=CHUNK)(lora, base, batch)
    np.testing.assert_allclose(float(eval_loss), float(ref_loss), rtol=1e-6)
    assert int(eval_count) == int(ref_count)


@pytest.mark.parametrize("trainable", ["lora", "all"])
def test_loss_grads_with_tied_softcapped_head_match_full_logits(trainable):
    """A tied, soft-capped head (Gemma-2) with LoRA on it: the loss's own backward pass (each chunk's
    gradients computed with its forward) against autodiff of the full logits, for LoRA params and
    for every parameter (demo pretraining differentiates the embedding through head and lookup)."""
    config = TINY.replace(name="tiny-gemma2", model_type="gemma2", tie_embeddings=True, final_logit_softcapping=3.0,
                          norm_class="RMSNorm", mlp_class="GemmaMLP", norm_unit_offset=True, scale_embeddings=True)
    lora = LoRAConfig(r=4, alpha=8, query=True, head=True)
    model = GPT(config, lora, param_dtype=jnp.float32, compute_dtype=jnp.float32, rngs=nnx.Rngs(3))
    model.lm_head.adapter.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(4), model.lm_head.adapter.lora_b.shape)
    graphdef, params, rest = (nnx.split(model, nnx.LoRAParam, ...) if trainable == "lora"
                              else nnx.split(model, nnx.Param, ...))
    batch = random_batch(np.random.default_rng(2), (2, 19), pad_from=15)

    def chunked(params):  # a mean, as the train step takes: the loss sum's cotangent is not 1
        loss_sum, count = sequence_loss(nnx.merge(graphdef, params, rest), batch["input_ids"], batch["labels"],
                                        chunk_size=CHUNK)
        return loss_sum / count

    def reference(params):
        logits = nnx.merge(graphdef, params, rest)(batch["input_ids"])[:, :-1, :VOCAB]
        targets = batch["labels"][:, 1:]
        valid = targets != IGNORE_INDEX
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
        return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.sum(valid)

    loss, grads = jax.jit(jax.value_and_grad(chunked))(params)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference))(params)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(grads)[0]]
    assert any("lm_head" in n for n in names) and (trainable == "lora" or any("wte" in n for n in names))
    for name, g, r in zip(names, jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        if "lm_head" in name or "wte" in name:
            assert np.abs(np.asarray(r)).max() > 0, name  # the head's gradients are non-trivial
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=1e-6, err_msg=name)  # f32 sums in another order


def test_no_full_vocab_logits_in_compiled_step(split):
    """The compiled train step (forward and backward) holds at most one chunk of logits at a time."""
    graphdef, lora, base = split
    tx, _ = make_optimizer("sgd", lr=0.1, total_steps=10)
    step = make_train_step(graphdef, tx, accum_steps=1, chunk_size=CHUNK)
    b, t, vp = 3, 40, TINY.padded_vocab_size
    batch = jax.tree.map(jnp.asarray, random_batch(np.random.default_rng(0), (1, b, t)))
    state = init_train_state(lora, tx)
    hlo = step.lower(state, base, batch, jax.random.key(0)).compile().as_text()
    biggest = 0
    for dims in re.findall(r"f32\[([0-9,]+)\]", hlo):
        shape = [int(d) for d in dims.split(",")]
        if vp in shape:
            biggest = max(biggest, int(np.prod(shape)))
    assert biggest <= 2 * b * CHUNK * vp < b * t * vp  # never [b, t, vocab]


@pytest.fixture(scope="module")
def accumulation_runs(split):
    """2 optimizer steps of 3 micro-batches of 2 vs 2 steps of one batch of 6 (same rows)."""
    graphdef, lora, base = split
    base_before = _as_tree(base)
    tx, _ = make_optimizer("sgd", lr=0.5, momentum=0.9, total_steps=10)
    rng = np.random.default_rng(2)
    # Different padding per micro-batch: token counts differ, so a mean of means would not match.
    batches = []
    for _ in range(2):
        rows = [random_batch(rng, (2, 16), pad_from=p) for p in (16, 9, 5)]
        batches.append({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    results = {}
    for accum in (3, 1):
        step = make_train_step(graphdef, tx, accum_steps=accum, chunk_size=CHUNK)
        state = init_train_state(lora, tx)
        history = []
        for batch in batches:
            batch = {k: jnp.asarray(v.reshape(accum, 6 // accum, 16)) for k, v in batch.items()}
            state, metrics = step(state, base, batch, jax.random.key(0))
            history.append(jax.device_get(metrics))
        results[accum] = (_as_tree(state), history)
    return results, base, base_before


def test_accumulation_equals_one_big_batch(accumulation_runs):
    results, _, _ = accumulation_runs
    (acc_state, acc_hist), (big_state, big_hist) = results[3], results[1]
    for a, b in zip(acc_hist, big_hist):
        assert int(a["tokens"]) == int(b["tokens"])
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    assert int(acc_state.step) == int(big_state.step) == 2
    for a, b in zip(jax.tree.leaves(acc_state.lora), jax.tree.leaves(big_state.lora)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # f32, summation order only


def test_base_params_bitwise_unchanged(accumulation_runs):
    _, base, base_before = accumulation_runs
    after = _as_tree(base)  # also proves base was not donated: its buffers are still readable
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(base_before)):
        np.testing.assert_array_equal(a, b)


def test_optimizer_state_holds_only_lora_leaves(split):
    graphdef, lora, base = split
    tx, _ = make_optimizer("adamw", lr=1e-3, total_steps=10, weight_decay=0.01, max_norm=1.0)
    state = init_train_state(lora, tx)
    lora_shapes = sorted(x.shape for x in jax.tree.leaves(lora))
    arrays = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sorted(x.shape for x in arrays) == sorted(lora_shapes * 2)  # Adam mu and nu
    n_lora = sum(x.size for x in jax.tree.leaves(lora))
    assert sum(x.size for x in arrays) == 2 * n_lora
    assert n_lora == count_lora_params(nnx.merge(graphdef, lora, base))
    assert all(x.dtype == jnp.float32 for x in arrays)


def test_multisteps_matches_scan_with_equal_token_counts():
    graphdef, lora, base = tiny_split(dropout=0.1)
    rng = np.random.default_rng(3)
    equal = [random_batch(rng, (2, 2, 16)) for _ in range(2)]  # every micro-batch: 2 x 13 targets
    unequal = random_batch(rng, (2, 2, 16))
    unequal["labels"][1, :, 8:] = IGNORE_INDEX
    key = jax.random.key(7)
    tx_scan, _ = make_optimizer("sgd", lr=0.5, momentum=0.9, total_steps=10, max_norm=5.0)
    tx_multi, _ = make_optimizer("sgd", lr=0.5, momentum=0.9, total_steps=10, max_norm=5.0, multisteps=2)
    scan_step = make_train_step(graphdef, tx_scan, accum_steps=2, chunk_size=CHUNK)
    multi_step = make_train_step(graphdef, tx_multi, accum_steps=2, mode="multisteps", chunk_size=CHUNK)
    s_scan, s_multi = init_train_state(lora, tx_scan), init_train_state(lora, tx_multi)
    for batch in equal:
        batch = jax.tree.map(jnp.asarray, batch)
        s_scan, m_scan = scan_step(s_scan, base, batch, key)
        s_multi, m_multi = multi_step(s_multi, base, batch, key)
        np.testing.assert_allclose(m_scan["loss"], m_multi["loss"], rtol=1e-6)
        np.testing.assert_allclose(m_scan["grad_norm"], m_multi["grad_norm"], rtol=1e-5)
        assert int(m_scan["tokens"]) == int(m_multi["tokens"])
    assert int(s_scan.step) == int(s_multi.step) == 2
    for a, b in zip(jax.tree.leaves(_as_tree(s_scan.lora)), jax.tree.leaves(_as_tree(s_multi.lora))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Unequal token counts: MultiSteps' mean of per-micro-batch means weighs tokens differently.
    batch = jax.tree.map(jnp.asarray, unequal)
    _, m_scan = scan_step(s_scan, base, batch, key)
    _, m_multi = multi_step(s_multi, base, batch, key)
    assert abs(float(m_scan["grad_norm"]) - float(m_multi["grad_norm"])) > 1e-4
    assert multi_step.micro_step._cache_size() == 1


def test_any_negative_ignore_index_is_ignored_by_the_loss(split):
    """data.ignore_index flows into the labels; the loss leaves out every negative label, so -1 and -100
    give the same loss, tokens and gradients (before, -1 labels were trained on as token id -1)."""
    graphdef, lora, base = split
    batch = random_batch(np.random.default_rng(5), (1, 2, 16), prompt_len=4, pad_from=12)
    other = {"input_ids": batch["input_ids"], "labels": np.where(batch["labels"] == IGNORE_INDEX, -1, batch["labels"])}
    tx = optax.sgd(1.0)
    step = make_train_step(graphdef, tx, accum_steps=1)
    out = [step(init_train_state(lora, tx), base, b, jax.random.key(0)) for b in (batch, other)]
    (s1, m1), (s2, m2) = out
    assert int(m1["tokens"]) == int(m2["tokens"]) == 2 * 8  # per row: labels 4..11 are targets
    np.testing.assert_array_equal(np.asarray(m1["loss"]), np.asarray(m2["loss"]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), s1.lora, s2.lora)


def test_train_step_rejects_wrong_accumulation(split):
    graphdef, lora, base = split
    tx, _ = make_optimizer("sgd", lr=0.1, total_steps=10)
    with pytest.raises(ConfigError, match="grad_accumulation mode"):
        make_train_step(graphdef, tx, accum_steps=2, mode="other")
    with pytest.raises(ConfigError, match="multisteps"):
        make_train_step(graphdef, tx, accum_steps=2, mode="multisteps")(
            init_train_state(lora, tx), base, jax.tree.map(jnp.asarray, random_batch(np.random.default_rng(0),
                                                                                  (2, 1, 8))), jax.random.key(0))


# -- optimizer and schedule --------------------------------------------------------------------

def test_schedule_warmup_then_cosine_to_min_lr():
    s = make_schedule(1.0, 10, warmup_steps=3, min_lr=0.1)
    values = [float(s(i)) for i in range(12)]
    np.testing.assert_allclose(values[:4], [0.0, 1 / 3, 2 / 3, 1.0], rtol=1e-6)
    assert all(a > b for a, b in zip(values[3:10], values[4:11]))
    np.testing.assert_allclose(values[10:], [0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(float(s(3 + 7 / 2)), 0.1 + 0.9 * 0.5, rtol=1e-6)  # cosine midpoint
    assert float(make_schedule(1.0, 10)(0)) == 1.0  # no warmup: the first step runs at lr
    assert warmup_steps_for(10, warmup_fraction=0.25) == 3 and warmup_steps_for(10, warmup_steps=50) == 10
    with pytest.raises(ConfigError):
        warmup_steps_for(10, warmup_steps=2, warmup_fraction=0.1)


def test_every_optimizer_updates_and_clipping_bounds_the_step():
    params = {"a": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
    grads = {"a": jnp.full((4, 3), 10.0), "b": jnp.full((3,), -10.0)}
    txs = {name: make_optimizer(name, lr=0.1, total_steps=5, weight_decay=0.01)[0] for name in OPTIMIZERS}
    txs["clipped"] = make_optimizer("sgd", lr=1.0, total_steps=5, max_norm=1.0)[0]
    updates = jax.jit(lambda: {n: tx.update(grads, tx.init(params), params)[0] for n, tx in txs.items()})()
    for name, u in updates.items():
        assert all(np.all(np.isfinite(x)) and np.any(x != 0) for x in jax.tree.leaves(u)), name
    np.testing.assert_allclose(float(optax.tree.norm(updates["clipped"])), 1.0, rtol=1e-6)
    assert make_optimizer("AdamW", lr=0.1, total_steps=5)[0] is not None  # LitGPT's spelling
    with pytest.raises(ConfigError, match="unknown optimizer"):
        make_optimizer("rmsprop", lr=0.1, total_steps=5)


# -- precision ---------------------------------------------------------------------------------

def test_resolve_precision():
    policy, message = resolve_precision(None, backend="cpu")
    assert policy.name == "32-true" and "picked" in message and "cpu" in message
    policy, message = resolve_precision(None, backend="tpu")
    assert policy is POLICIES["bf16-true"] and "natively" in message
    assert policy.param_dtype == jnp.bfloat16 and policy.compute_dtype == jnp.bfloat16
    mixed, _ = resolve_precision("bf16-mixed")
    assert (mixed.param_dtype, mixed.compute_dtype) == (jnp.float32, jnp.bfloat16)
    assert {p.compute_dtype for p in POLICIES.values()} == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                                                             jnp.dtype(jnp.float32)}
    assert backend_supports_bf16("cpu") is False
    with pytest.raises(ConfigError, match="unknown precision"):
        resolve_precision("bf16")
