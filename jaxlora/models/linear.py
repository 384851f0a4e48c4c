"""The frozen linear map: it owns its kernel's storage and matmul, and carries an optional adapter.

`Linear` computes `y = x W + b (+ the adapter's change)`. What W is made of is known here only:

- a float kernel, `kernel` [*lead, in, out] in the param dtype (fp32/bf16/fp16); inside the layer
  scan a 16-bit kernel arrives as its bits (`packing.to_storage`) and is decoded right here;
- a quantized kernel (QLoRA), `kernel` a `QuantizedKernel` holding `models.quant`'s fields
  (4-bit codes two per byte, absmax scales, ...), dequantised right before the matmul, so the layer
  scan only ever holds one layer's weights in full precision (and the backward pass recomputes them);
- a tied kernel (`tied=True`): no kernel here, the caller passes the embedding [out, in] per call.

Lead dims are experts (an MoE layer's batched kernels: x [..., e, in] for dense dispatch, or x [m, in]
rows sorted by expert with their `grouped.ExpertGroups` for sparse dispatch) or nothing (x [..., in]).
The adapter (`models.adapters`) is a submodule; its params live under `<path>.adapter`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.models import packing, quant
from jaxlora.models.grouped import ExpertGroups

EXPERT_SPEC = "...ei,eio->...eo"  # x [..., e, in] times kernel [e, in, out]


def logical_axes(names: tuple, eager: bool = False) -> dict:
    """Param metadata naming each axis (`training.sharding.RULES` maps the names to mesh axes)."""
    return dict(out_sharding=names, eager_sharding=eager)


def _dot(a: jax.Array, b: jax.Array, a_dim: int, b_dim: int) -> jax.Array:
    """2-D a, b contracted over a's `a_dim` and b's `b_dim`, accumulated and returned in fp32."""
    return jax.lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((), ())), preferred_element_type=jnp.float32)


def matmul(x: jax.Array, w: jax.Array, transposed: bool, out_dtype) -> jax.Array:
    """x [n, in] times w [in, out] (w [out, in] if `transposed`) -> [n, out] in `out_dtype`.

    w: a float array, or a frozen weight as its bits (`packing.to_storage`: no gradient), cast to
    x's dtype (the compute dtype) for the products. Every product, backward ones included,
    multiplies in that dtype and accumulates in fp32: plain autodiff of such a dot upcasts the
    weight to fp32 for the backward products, and XLA's CPU backend runs bf16 x bf16 -> fp32 dots
    several times faster than fp32 ones where the CPU has AMX / AVX512-BF16 (benchmarks/RESULTS.md).
    The backward pass keeps x and w as bits (`packing`). In fp32 this is an ordinary dot.
    """
    x_dtype, w_dtype = x.dtype, w.dtype
    frozen = packing.is_bits(w_dtype)

    def product(x, w):
        return _dot(x, packing.from_storage(w).astype(x.dtype), 1, 1 if transposed else 0).astype(out_dtype)

    @jax.custom_vjp
    def f(x, w):
        return product(x, w)

    def fwd(x, w):
        return product(x, w), (packing.pack(x), packing.pack(w))

    def bwd(saved, g):
        x, w = packing.from_storage(saved[0]), packing.from_storage(saved[1]).astype(x_dtype)
        g = g.astype(x_dtype)  # [n, out]
        dx = _dot(g, w, 1, 0 if transposed else 1).astype(x_dtype)
        if frozen:
            return dx, None
        dw = (_dot(g, x, 0, 0) if transposed else _dot(x, g, 0, 0)).astype(w_dtype)  # dropped by XLA if unused
        return dx, dw

    f.defvjp(fwd, bwd)
    return f(x, w)


class QuantizedKernel(nnx.Module):
    """A frozen kernel [*lead, in, out] stored in a `models.quant` format (one nnx.Param per field)."""

    def __init__(self, fmt: str, shape: tuple[int, ...], axes: tuple):
        self.fmt, self.in_features = fmt, shape[-2]
        self.names = tuple(quant.fields(fmt, shape, axes))
        for name, field in quant.fields(fmt, shape, axes).items():
            # a scalar per kernel (the -dq offset) has no axis to name: None, so stacking adds none either
            setattr(self, name, nnx.Param(jnp.zeros(field.shape, field.dtype), **logical_axes(field.axes or None)))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}

    def dequantize(self, dtype) -> jax.Array:
        return quant.dequantize(self.arrays(), self.fmt, self.in_features, dtype)


class Linear(nnx.Module):
    """A frozen linear map [*lead, in] -> [*lead, out] with an optional adapter (`models.adapters`).

    axes: logical names of (in, out); batch_dims: ((size, name), ...) of lead dims (experts).
    quantize: a `models.quant` format for the kernel (None: float in `param_dtype`).
    adapter: a callable `(in_features, out_features, lead_shape, lead_axes, axes, rngs) -> module`
    (rngs by keyword) building the attached adapter, or None.
    """

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 use_bias: bool = False, batch_dims: tuple[tuple[int, str], ...] = (), param_dtype=jnp.float32,
                 tied: bool = False, quantize: str | None = None, adapter=None, rngs: nnx.Rngs):
        lead_shape = tuple(n for n, _ in batch_dims)
        lead_axes = tuple(a for _, a in batch_dims)
        self.experts = bool(batch_dims)
        self.param_dtype = jnp.dtype(param_dtype)  # a quantized kernel's dequantised (and merged) dtype
        shape = lead_shape + (in_features, out_features)
        if tied:
            self.kernel = None
        elif quantize is not None:
            self.kernel = QuantizedKernel(quantize, shape, lead_axes + axes)
        else:
            bound = 1.0 / math.sqrt(in_features)  # torch nn.Linear default; HF weights overwrite it
            self.kernel = nnx.Param(jax.random.uniform(rngs.params(), shape, param_dtype, -bound, bound),
                                    **logical_axes(lead_axes + axes))
        self.bias = (nnx.Param(jnp.zeros(lead_shape + (out_features,), param_dtype),
                               **logical_axes(lead_axes + (axes[1],))) if use_bias else None)
        self.adapter = (None if adapter is None else
                        adapter(in_features, out_features, lead_shape, lead_axes, axes, rngs=rngs))

    @property
    def quantized(self) -> bool:
        return isinstance(self.kernel, QuantizedKernel)

    def weight(self, dtype=jnp.float32, tied_kernel: jax.Array | None = None) -> jax.Array:
        """The kernel as a float array [*lead, in, out] in `dtype` (dequantised; a tied one transposed)."""
        if self.kernel is None:
            return packing.from_storage(tied_kernel).T.astype(dtype)
        if self.quantized:
            return self.kernel.dequantize(dtype)
        return packing.from_storage(self.kernel[...]).astype(dtype)

    def frozen(self, x: jax.Array, out_dtype, tied_kernel: jax.Array | None = None,
               groups: ExpertGroups | None = None) -> jax.Array:
        """x W without the bias: x [n, in] (dense), [..., e, in] (experts) or [m, in] (experts, sorted rows of
        `groups`) -> [n | ... | m, out] in `out_dtype`."""
        if self.quantized:  # dequantised inside a checkpoint: the backward pass keeps the codes, not W
            fmt, n_in, names = self.kernel.fmt, self.kernel.in_features, self.kernel.names
            group_arrays, group_tree = jax.tree.flatten(groups)  # (the checkpoint takes arrays only)

            def product(x, *arrays):
                groups = jax.tree.unflatten(group_tree, arrays[:len(group_arrays)])
                w = quant.dequantize(dict(zip(names, arrays[len(group_arrays):])), fmt, n_in, x.dtype)
                return self._product(x, w, False, out_dtype, groups)

            return packing.checkpoint(product)(x, *group_arrays, *self.kernel.arrays().values())
        if self.kernel is None:
            return self._product(x, tied_kernel, True, out_dtype)
        return self._product(x, self.kernel[...], False, out_dtype, groups)

    def _product(self, x, w, transposed, out_dtype, groups=None):
        if groups is not None:
            return groups.matmul(x, packing.from_storage(w), out_dtype)
        if self.experts:
            return jnp.einsum(EXPERT_SPEC, x, packing.from_storage(w).astype(x.dtype), preferred_element_type=out_dtype)
        return matmul(x, w, transposed, jnp.dtype(out_dtype))

    def bias_for(self, dtype, groups: ExpertGroups | None = None) -> jax.Array:
        """The bias [*lead, out] in `dtype` ([m, out], each row its expert's, with `groups`)."""
        bias = packing.from_storage(self.bias[...]).astype(dtype)
        return bias if groups is None else groups.per_row(bias)

    def __call__(self, x: jax.Array, *, tied_kernel: jax.Array | None = None, dropout_key: jax.Array | None = None,
                 out_dtype=None, groups: ExpertGroups | None = None) -> jax.Array:
        """x: [..., in] ([..., e, in] for experts, or [m, in] rows sorted by `groups`) in the compute dtype ->
        [..., out] in `out_dtype` (default x's dtype). tied_kernel: the embedding [out, in] of a tied layer
        (as stored or as bits).

        Dense layers multiply as 2-D dots (`matmul`): XLA's CPU backend makes slow transposed copies
        of the gradients of [b, t, .] ones (2-3x the step time at 5-100M params).
        """
        out_dtype = jnp.dtype(out_dtype or x.dtype)
        lead = x.shape[:-1]
        if not self.experts:
            x = x.reshape(-1, x.shape[-1])
        y = self.frozen(x, out_dtype, tied_kernel, groups)
        if self.bias is not None:
            y = y + self.bias_for(out_dtype, groups)
        if self.adapter is not None:
            y = self.adapter(x, y, self, tied_kernel=tied_kernel, dropout_key=dropout_key, groups=groups)
        return y.reshape(*lead, y.shape[-1])


def linear_layers(model: nnx.Module):
    """(path, layer) for every `Linear` of the model."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            yield path, node
