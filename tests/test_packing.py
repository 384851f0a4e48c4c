"""16-bit weights and saved activations carried as bits through the layer scan (jaxlora.models.packing).

The bits must decode to exactly the floats they hold, everywhere a block reads a weight (kernels,
biases, norms, MoE router) and everywhere the backward pass reads a saved activation; a missed
decode turns weights into integers, so the comparisons below are against the same values held
in fp32 and fail by orders of magnitude on any such bug.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from _hf_helpers import tokens
from jaxlora.models import packing
from jaxlora.models.lora import split_lora
from jaxlora.training.step import sequence_loss

FAMILIES = ("llama", "qwen2", "gpt_neox", "mixtral", "gemma2")  # GQA; biases + tied; LayerNorm + parallel; MoE; softcaps
LORA = jaxlora.LoRAConfig(r=4, alpha=8, query=True, key=True, value=True, projection=True, mlp=True)


def _load(path, dtype, compute_dtype, values=None):
    """load_model, then (optionally) every param set to `values`' entries cast to `dtype`."""
    model = jaxlora.load_model(path, dtype=dtype, compute_dtype=compute_dtype, lora=LORA)
    if values is not None:
        nnx.update(model, jax.tree.map(lambda v, p: v.astype(p.dtype), values, nnx.state(model)))
    return model


def _randomized(model):
    state = nnx.state(model, nnx.LoRAParam)
    rng = np.random.RandomState(1)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), state))
    return model


@pytest.mark.parametrize("family", FAMILIES + ("gemma3", "stablelm", "olmo2"))  # + QK-norms of 3 shapes
def test_bf16_weights_give_the_logits_of_the_same_values_in_fp32(hf_checkpoints, family):
    path, _ = hf_checkpoints[family]
    m16 = _randomized(_load(path, "bfloat16", "float32"))
    m32 = _load(path, "float32", "float32", values=nnx.state(m16))
    ids = jnp.asarray(tokens(), jnp.int32)
    forward = jax.jit(lambda g, s, x: nnx.merge(g, s)(x))
    # The same fp32 products of the same values: only fusion boundaries differ (observed: equal).
    np.testing.assert_allclose(np.asarray(forward(*nnx.split(m16), ids)), np.asarray(forward(*nnx.split(m32), ids)),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_true_lora_gradients_equal_bf16_mixed_on_the_same_values(hf_checkpoints, family):
    """bf16-true keeps frozen weights as bf16 bits in the scan; bf16-mixed keeps them in fp32 (no
    packing). Holding the same bf16-representable values, every product sees the same bf16 operands,
    forward and backward, so loss and LoRA gradients agree."""
    path, _ = hf_checkpoints[family]
    true_model = _randomized(_load(path, "bfloat16", "bfloat16"))
    mixed_model = _load(path, "float32", "bfloat16", values=nnx.state(true_model))
    ids = jnp.asarray(tokens(batch=2), jnp.int32)

    @jax.jit
    def loss_and_grads(graphdef, lora, base):
        def loss(lora):
            total, count = sequence_loss(nnx.merge(graphdef, lora, base), ids, ids, chunk_size=4)
            return total / count
        return jax.value_and_grad(loss)(lora)

    (l16, g16), (l32, g32) = (loss_and_grads(*split_lora(m)) for m in (true_model, mixed_model))
    # bf16 activations both sides; observed equal, the tolerance allows a bf16 rounding flip (2^-8) in a sum
    np.testing.assert_allclose(float(l16), float(l32), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-2, atol=1e-3 * float(jnp.abs(b).max()))


def test_bf16_train_step_keeps_no_fp32_copy_of_the_stacked_weights(hf_checkpoints):
    """XLA:CPU upcasts a bf16 dynamic-slice over its whole operand; with the weights sliced as bits
    the compiled step holds no fp32 [n_layer, in, out] copy of any frozen kernel (it held one of
    every kernel before)."""
    path, _ = hf_checkpoints["llama"]
    graphdef, lora, base = split_lora(_load(path, "bfloat16", "bfloat16"))
    ids = jnp.asarray(tokens(batch=2), jnp.int32)

    def loss(lora):
        return sequence_loss(nnx.merge(graphdef, lora, base), ids, ids, chunk_size=4)[0]

    hlo = jax.jit(jax.grad(loss)).lower(lora).compile().as_text()
    kernels = [x.shape for x in jax.tree.leaves(nnx.state(base)) if x.ndim == 3 and x.dtype == jnp.bfloat16]
    assert kernels, "expected stacked bf16 block kernels"
    for shape in kernels:
        assert not re.search(rf"f32\[{','.join(map(str, shape))}\]", hlo), shape


def test_differentiating_a_16bit_frozen_weight_is_an_error_not_a_zero_gradient(hf_checkpoints):
    path, _ = hf_checkpoints["llama"]
    graphdef, lora, base = split_lora(_load(path, "bfloat16", "float32"))
    ids = jnp.asarray(tokens(), jnp.int32)

    def loss(base):
        return jnp.sum(nnx.merge(graphdef, lora, base)(ids))

    with pytest.raises(TypeError, match="16-bit frozen weight was differentiated"):
        jax.grad(loss)(base)


def test_pack_round_trips_16bit_floats_and_leaves_other_dtypes():
    x = jnp.asarray([1.5, -2.0, 3e-3], jnp.bfloat16)
    assert packing.pack(x).dtype == jnp.uint16
    np.testing.assert_array_equal(np.asarray(packing.from_storage(packing.pack(x))), np.asarray(x))
    h = x.astype(jnp.float16)
    assert packing.pack(h).dtype == jnp.int16 and packing.from_storage(packing.pack(h)).dtype == jnp.float16
    f = jnp.ones(3, jnp.float32)
    assert packing.pack(f) is f and packing.from_storage(f) is f
