"""Adapters attached to a frozen `models.linear.Linear`: trainable modules that change its output.

`LoRA` (LitGPT / PEFT semantics; `DoRA` below): `y = x W + b + dropout(x) A B * scale`. `A` [*lead, in, r] is
kaiming-uniform (bound 1/sqrt(in), as torch's `kaiming_uniform_(a=sqrt(5))`), `B` [*lead, r, out]
is zeros, `scale = alpha / r` (or `alpha / sqrt(r)`, rsLoRA). Params are `nnx.LoRAParam` (so
`lora.split_lora` separates them from the frozen weights) and fp32 whatever the frozen dtype.
Dropout applies to the adapter's input only, and only when a dropout key is passed (training).

An adapter is called as `adapter(x, y, layer, tied_kernel=..., dropout_key=..., groups=...)` with the
layer's input x ([n, in]; for experts [..., e, in], or [m, in] rows sorted by expert with their
`grouped.ExpertGroups`), its frozen output y (bias included) and the layer itself (for its weight),
and returns the adapted output; `merge(w)` folds it into a float kernel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.models.grouped import ExpertGroups
from jaxlora.models.linear import EXPERT_SPEC, logical_axes, matmul


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class LoRA(nnx.Module):
    """A low-rank update A B * scale of a frozen linear map's kernel."""

    def __init__(self, in_features: int, out_features: int, lead_shape: tuple, lead_axes: tuple, axes: tuple, *,
                 rank: int, scale: float, dropout: float, rngs: nnx.Rngs):
        self.rank, self.scale, self.dropout = rank, scale, dropout
        bound = 1.0 / math.sqrt(in_features)
        self.lora_a = nnx.LoRAParam(
            jax.random.uniform(rngs.params(), lead_shape + (in_features, rank), jnp.float32, -bound, bound),
            **logical_axes(lead_axes + (axes[0], None)))
        self.lora_b = nnx.LoRAParam(jnp.zeros(lead_shape + (rank, out_features), jnp.float32),
                                    **logical_axes(lead_axes + (None, axes[1])))

    def update(self, x: jax.Array, out_dtype, experts: bool, groups: ExpertGroups | None = None) -> jax.Array:
        """x A B * scale (x already dropped out) in `out_dtype`; scaled as the [..., r] product (in fp32),
        so no scaled [..., out] copy exists, forward or backward. groups: x holds sorted expert rows, and
        each row meets its own expert's A and B (grouped low-rank products)."""
        dtype = x.dtype
        a, b = self.lora_a[...], self.lora_b[...]  # fp32, multiplied in the compute dtype
        if groups is not None:
            xa = (groups.matmul(x, a, jnp.float32) * self.scale).astype(dtype)
            return groups.matmul(xa, b, out_dtype)
        if experts:  # in the compute dtype first: XLA:CPU has no batched bf16 x bf16 -> f32 dot
            xa = (jnp.einsum(EXPERT_SPEC, x, a.astype(dtype)).astype(jnp.float32) * self.scale).astype(dtype)
            return jnp.einsum(EXPERT_SPEC, xa, b.astype(dtype), preferred_element_type=out_dtype)
        xa = (matmul(x, a, False, jnp.dtype(jnp.float32)) * self.scale).astype(dtype)
        return matmul(xa, b, False, jnp.dtype(out_dtype))

    def __call__(self, x, y, layer, *, tied_kernel=None, dropout_key=None, groups=None):
        return y + self.update(_dropout(x, self.dropout, dropout_key), y.dtype, layer.experts, groups)

    def delta(self) -> jax.Array:
        """A B * scale [*lead, in, out] in fp32."""
        return jnp.einsum("...ir,...ro->...io", self.lora_a[...], self.lora_b[...]) * self.scale

    def merge(self, w: jax.Array) -> jax.Array:
        """The kernel w [*lead, in, out] with this update folded in, computed in fp32, in w's dtype."""
        return (w.astype(jnp.float32) + self.delta()).astype(w.dtype)


class DoRA(LoRA):
    """Weight-decomposed LoRA (Liu et al. 2024; PEFT's `use_dora`): a trainable magnitude m [*lead, out]
    rescales each output column of the adapted kernel W + A B * scale to m / its L2 norm over inputs.

        y = x W + b + (m / n - 1) * dropout(x) W + (m / n) * dropout(x) A B * scale,
        n = ||W + A B * scale|| per output column, taken as a constant (no gradient), as PEFT does.

    m starts at the column norms of W (`init_magnitude`), so the model starts as the base. W is the
    layer's weight as the forward pass sees it (a quantized kernel dequantised: QDoRA).
    """

    def __init__(self, in_features: int, out_features: int, lead_shape: tuple, lead_axes: tuple, axes: tuple, *,
                 rank: int, scale: float, dropout: float, rngs: nnx.Rngs):
        super().__init__(in_features, out_features, lead_shape, lead_axes, axes, rank=rank, scale=scale,
                         dropout=dropout, rngs=rngs)
        self.magnitude = nnx.LoRAParam(jnp.ones(lead_shape + (out_features,), jnp.float32),
                                       **logical_axes(lead_axes + (axes[1],)))

    def column_norm(self, w: jax.Array) -> jax.Array:
        """||w + A B * scale|| over inputs [*lead, out] (fp32, no gradient); w [*lead, in, out] fp32."""
        return jax.lax.stop_gradient(jnp.linalg.norm(w + self.delta(), axis=-2))

    def init_magnitude(self, w: jax.Array) -> None:
        """m = the column norms of the adapted kernel (w: the layer's weight, fp32)."""
        self.magnitude[...] = self.column_norm(w.astype(jnp.float32))

    def __call__(self, x, y, layer, *, tied_kernel=None, dropout_key=None, groups=None):
        ratio = self.magnitude[...] / self.column_norm(layer.weight(jnp.float32, tied_kernel))  # [*lead, out]
        if groups is not None:
            ratio = groups.per_row(ratio)  # [m, out]
        if dropout_key is None or self.dropout == 0.0:
            xd = x
            base = y if layer.bias is None else y - layer.bias_for(y.dtype, groups)  # x W
        else:
            xd = _dropout(x, self.dropout, dropout_key)
            base = layer.frozen(xd, y.dtype, tied_kernel, groups)
        ratio = ratio.astype(y.dtype)
        return y + (ratio - 1) * base + ratio * self.update(xd, y.dtype, layer.experts, groups)

    def merge(self, w: jax.Array) -> jax.Array:
        """m / n * (w + A B * scale), computed in fp32, in w's dtype."""
        adapted = w.astype(jnp.float32) + self.delta()
        return (adapted * (self.magnitude[...] / jnp.linalg.norm(adapted, axis=-2))[..., None, :]).astype(w.dtype)
