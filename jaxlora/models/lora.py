"""LoRA with LitGPT semantics: `y = x W + b + dropout(x) A B * scale`.

`A` [in, r] is kaiming-uniform (bound 1/sqrt(in), as torch's `kaiming_uniform_(a=sqrt(5))`),
`B` [r, out] is zeros, `scale = alpha / r` (or `alpha / sqrt(r)` with rsLoRA). LoRA weights are
`nnx.LoRAParam` so that `split_lora` can separate them from the frozen weights; they are kept in
fp32 whatever the frozen dtype. Dropout applies to the LoRA branch only, and only when a
dropout key is passed (training).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.errors import ConfigError
from jaxlora.models import packing

LORA_TARGETS = ("query", "key", "value", "projection", "mlp", "head")
DENSE_SPEC = "...i,io->...o"  # x [..., in] times kernel [in, out]


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


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    r: int = 0  # 0 disables LoRA
    alpha: float = 16.0
    dropout: float = 0.0
    query: bool = False
    key: bool = False
    value: bool = False
    projection: bool = False
    mlp: bool = False  # every MLP matrix, experts included (not the MoE router)
    head: bool = False
    use_rslora: bool = False

    def __post_init__(self):
        if self.r < 0:
            raise ConfigError(f"lora_r must be >= 0 (0 disables LoRA), got {self.r}")
        if self.r > 0 and self.alpha <= 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        if self.r == 0:
            return 0.0
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_for(self, target: str) -> int:
        """The rank of the adapter on `target` (one of LORA_TARGETS): r if switched on, else 0."""
        return self.r if getattr(self, target) else 0

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t in LORA_TARGETS if getattr(self, t)) if self.r else ()


def logical_axes(names: tuple, eager: bool = False) -> dict:
    """Param metadata naming each axis (`training.sharding.RULES` maps the names to mesh axes)."""
    return dict(out_sharding=names, eager_sharding=eager)


class LoRALinear(nnx.Module):
    """A frozen linear map with an optional LoRA adapter.

    kernel: [*batch_dims, in, out] in `param_dtype` (batch_dims: experts of an MoE layer).
    lora_a: [*batch_dims, in, r] fp32; lora_b: [*batch_dims, r, out] fp32.
    With `has_kernel=False` the kernel comes from the caller (tied embeddings): only bias/LoRA live here.
    """

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 rank: int, lora: LoRAConfig, use_bias: bool = False, batch_dims: tuple[tuple[int, str], ...] = (),
                 param_dtype=jnp.float32, has_kernel: bool = True, rngs: nnx.Rngs):
        lead_shape = tuple(n for n, _ in batch_dims)
        lead_axes = tuple(a for _, a in batch_dims)
        self.rank = rank
        self.scale = lora.scale if rank else 0.0
        self.dropout = lora.dropout
        if has_kernel:
            bound = 1.0 / math.sqrt(in_features)  # torch nn.Linear default; HF weights overwrite it
            self.kernel = nnx.Param(
                jax.random.uniform(rngs.params(), lead_shape + (in_features, out_features), param_dtype,
                                   -bound, bound), **logical_axes(lead_axes + axes))
        else:
            self.kernel = None
        self.bias = (nnx.Param(jnp.zeros(lead_shape + (out_features,), param_dtype),
                               **logical_axes(lead_axes + (axes[1],))) if use_bias else None)
        if rank:
            bound = 1.0 / math.sqrt(in_features)
            self.lora_a = nnx.LoRAParam(
                jax.random.uniform(rngs.params(), lead_shape + (in_features, rank), jnp.float32, -bound, bound),
                **logical_axes(lead_axes + (axes[0], None)))
            self.lora_b = nnx.LoRAParam(jnp.zeros(lead_shape + (rank, out_features), jnp.float32),
                                        **logical_axes(lead_axes + (None, axes[1])))
        else:
            self.lora_a = self.lora_b = None

    def __call__(self, x: jax.Array, *, kernel: jax.Array | None = None, kernel_transposed: bool = False,
                 dropout_key: jax.Array | None = None, spec: str = DENSE_SPEC, out_dtype=None) -> jax.Array:
        """x: [..., in] in the compute dtype -> [..., out] in `out_dtype` (default x's dtype).

        Dense layers (`spec` DENSE_SPEC) multiply with `matmul` (fp32 accumulation, fast bf16
        backward); `kernel` is a caller's kernel, [out, in] if `kernel_transposed` (a tied embedding).
        Other `spec`s are einsums, reused for x A and (x A) B, so they must not name the in/out sizes
        (expert-batched layers use "...ei,eio->...eo").
        """
        dtype = x.dtype
        out_dtype = out_dtype or dtype
        lead = x.shape[:-1]
        w = self.kernel[...] if kernel is None else kernel  # float, or bits inside the layer scan
        if spec == DENSE_SPEC:  # as 2-D dots: XLA's CPU backend makes slow transposed copies of the
            x = x.reshape(-1, x.shape[-1])  # gradients of [b, t, .] ones (2-3x the step time at 5-100M params)
            y = matmul(x, w, kernel_transposed, jnp.dtype(out_dtype))
        else:
            y = jnp.einsum(spec, x, packing.from_storage(w).astype(dtype), preferred_element_type=out_dtype)
        if self.bias is not None:
            y = y + packing.from_storage(self.bias[...]).astype(out_dtype)
        if self.rank:
            xd = x
            if dropout_key is not None and self.dropout > 0.0:
                keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout, x.shape)
                xd = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))
            a, b = self.lora_a[...], self.lora_b[...]  # fp32; `matmul` casts them to the compute dtype
            # scaled as the [..., r] product (in fp32), so no scaled [..., out] copy exists, forward or backward
            if spec == DENSE_SPEC:
                xa = (matmul(xd, a, False, jnp.dtype(jnp.float32)) * self.scale).astype(dtype)
                y = y + matmul(xa, b, False, jnp.dtype(out_dtype))
            else:
                a, b = a.astype(dtype), b.astype(dtype)
                # in the compute dtype first: XLA:CPU has no batched bf16 x bf16 -> f32 dot
                xa = (jnp.einsum(spec, xd, a).astype(jnp.float32) * self.scale).astype(dtype)
                y = y + jnp.einsum(spec, xa, b, preferred_element_type=out_dtype)
        return y.reshape(*lead, y.shape[-1])

    def merged_kernel(self) -> jax.Array:
        """kernel + A B * scale, computed in fp32 and cast back to the kernel dtype."""
        w = self.kernel[...]
        if not self.rank:
            return w
        delta = jnp.einsum("...ir,...ro->...io", self.lora_a[...], self.lora_b[...]) * self.scale
        return (w.astype(jnp.float32) + delta).astype(w.dtype)


def lora_layers(model: nnx.Module) -> Iterator[tuple[tuple, LoRALinear]]:
    """(path, layer) for every LoRALinear in the model."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LoRALinear):
            yield path, node


def split_lora(model: nnx.Module):
    """-> (graphdef, lora_params, base_params): two separate pytrees.

    `lora_params` holds every `nnx.LoRAParam` (trainable), `base_params` everything else (frozen).
    `nnx.merge(graphdef, lora_params, base_params)` rebuilds the model.
    """
    return nnx.split(model, nnx.LoRAParam, ...)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of `model` with every adapter folded into its kernel (W + A B * scale) and removed.

    The copy holds no LoRA params and gives the same outputs as `model` in eval mode. An adapter on a
    tied head unties it: the copy's head has its own kernel (config.tie_embeddings False).
    """
    merged = nnx.clone(model)
    for path, layer in lora_layers(merged):
        if not layer.rank:
            continue
        if layer.kernel is None:  # a head adapter on tied embeddings: the head gets its own (merged) kernel,
            # as PEFT does when it merges such an adapter; the embedding stays as it was
            if not hasattr(merged, "untie_head"):
                raise ConfigError(f"cannot merge the LoRA adapter of {'/'.join(map(str, path))}: its kernel is "
                                  "another layer's")
            merged.untie_head()
        layer.kernel[...] = layer.merged_kernel()
        layer.rank, layer.scale, layer.lora_a, layer.lora_b = 0, 0.0, None, None
    if hasattr(merged, "lora"):
        merged.lora = LoRAConfig()
    return merged


def count_lora_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
