"""The GPT: one NNX model covering Llama, Mistral, Mixtral, Qwen2.5, Phi, Gemma(-2), Falcon, GPT-NeoX.

Layout: embedding -> `n_layer` blocks stored stacked (every block param has a leading `layers`
axis) and run by `jax.lax.scan`, so compile time does not grow with depth -> final norm -> head.
All linear maps are `models.linear.Linear` with [in, out] kernels (float, or quantized with
`quantize`), each with the adapter `LoRAConfig` gives its path; q, k, v and the MLP's gate/up are
separate maps (fused HF tensors are split on load), so every projection has its own adapter.

Dtypes: frozen weights in their stored dtype, activations in `compute_dtype`, norms, softmax and
logits in fp32. Every parameter carries logical axis names (`out_sharding` metadata).

Decoding: `init_cache` preallocates a `KVCache` and `forward_with_cache` runs new tokens against
it. Both paths share every layer: the full forward is the cache path's special case of a sequence
attending to itself (query slots = key slots = 0..t-1), so only the masks and the k/v source differ.
"""

from __future__ import annotations

import logging
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.errors import ConfigError
from jaxlora.models.config import ModelConfig
from jaxlora.models import packing, rope
from jaxlora.models.grouped import (MOE_DISPATCH, ExpertGroups, load_balancing_loss, router_statistics,
                                    sparse_pays)
from jaxlora.models.linear import Linear, logical_axes
from jaxlora.models.lora import LoRAConfig, init_magnitudes

log = logging.getLogger(__name__)

# "none", "block" (remat each block, save nothing), or one of jax.checkpoint_policies' ready-made policies
REMAT_CHOICES = ("none", "block", "checkpoint_dots", "checkpoint_dots_with_no_batch_dims", "dots_saveable",
                 "dots_with_no_batch_dims_saveable", "everything_saveable", "nothing_saveable")


class Norm(nnx.Module):
    """RMSNorm (optionally Gemma's `1 + weight`) or LayerNorm over the last axis; computed in fp32,
    returns x's dtype. shape: the weight's shape (its leading axes broadcast over x's, as the
    per-head QK-norm weights [heads, head_size] do); bias: LayerNorm's bias (default: LayerNorm has one)."""

    def __init__(self, shape: int | tuple, config: ModelConfig, param_dtype, *, axes=("embed",), bias=None):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.kind = config.norm_class
        self.eps = config.norm_eps
        self.unit_offset = config.norm_unit_offset
        init = jnp.zeros if self.unit_offset else jnp.ones
        self.weight = nnx.Param(init(shape, param_dtype), **logical_axes(axes))
        has_bias = self.kind == "LayerNorm" if bias is None else bias
        self.bias = nnx.Param(jnp.zeros(shape, param_dtype), **logical_axes(axes)) if has_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        if self.kind == "LayerNorm":
            h = h - h.mean(-1, keepdims=True)
        h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + self.eps)
        w = packing.from_storage(self.weight[...]).astype(jnp.float32)
        h = h * (1.0 + w if self.unit_offset else w)
        if self.bias is not None:
            h = h + packing.from_storage(self.bias[...]).astype(jnp.float32)
        return h.astype(x.dtype)


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array, np.ndarray]:
    """positions int [b, t] -> (cos, sin fp32 [kinds, b, t, 1, rope_n_elem], kind of each layer int [n_layer]).

    Kind 0 is the model's RoPE (scaled as configured, times its attention scaling), kind 1 the
    sliding layers' own unscaled RoPE (Gemma 3's `rope_local_base`), and the last kind the identity
    for layers without RoPE (cos 1, sin 0: `apply_rope` returns x exactly). Rotate-half layout.
    """
    c = config
    n = c.rope_n_elem
    seq_len = jnp.max(positions) + 1 if rope.is_dynamic(c.rope_scaling) else None
    inv_freq, scale = rope.inv_freq_and_scaling(n, c.rope_base, c.rope_scaling, seq_len)
    tables = [(inv_freq, scale)]
    kind = np.zeros(c.n_layer, np.int32)
    if c.rope_local_base is not None:
        tables.append(rope.inv_freq_and_scaling(n, c.rope_local_base, None))
        kind[[c.attention_type(i) == "sliding" for i in range(c.n_layer)]] = len(tables) - 1
    cos, sin = [], []
    for inv_freq, scale in tables:
        angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, n/2]
        angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
        cos.append(jnp.cos(angles) * scale)
        sin.append(jnp.sin(angles) * scale)
    if c.nope_layers:
        cos.append(jnp.ones_like(cos[0]))
        sin.append(jnp.zeros_like(sin[0]))
        kind[list(c.nope_layers)] = len(cos) - 1
    return jnp.stack(cos), jnp.stack(sin), kind


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first cos.shape[-1] dims of every head of x [b, t, heads, head_size]."""
    n = cos.shape[-1]
    if n == 0:
        return x
    rot, rest = x[..., :n].astype(jnp.float32), x[..., n:]
    half = n // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = (rot * cos + rotated * sin).astype(x.dtype)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for `max_len` token slots, filled left to right.

    k, v: [n_layer, b, max_len, n_query_groups, head_size] (roped keys); valid: bool [b, max_len],
    True where a slot holds a real token (False for padding and unfilled slots); index: int32 [],
    the first unfilled slot.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array


def attention_masks(query_slots: jax.Array, key_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Causal padding mask bool [b, 1, t, s] and slot distance int [1, 1, t, s] (query minus key).

    query_slots: int [t], the slots of the queries; key_valid: bool [b, s], keys that are real tokens.
    """
    key_slots = jnp.arange(key_valid.shape[1])
    causal = query_slots[None, :, None] >= key_slots[None, None, :]  # [1, t(query), s(key)]
    mask = (causal & key_valid[:, None, :])[:, None]
    distance = (query_slots[:, None] - key_slots[None, :])[None, None]
    return mask, distance


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """int [b, t]: each token's index within its segment (a run of equal segment ids)."""
    t = segment_ids.shape[1]
    slots = jnp.arange(t)[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                             axis=1)
    return slots - jax.lax.cummax(jnp.where(starts, slots, 0), axis=1)


ATTENTION_IMPLS = ("auto", "xla", "cudnn")  # `jax.nn.dot_product_attention` implementations; auto: per backend


def attention_implementation(requested: str, config: ModelConfig, compute_dtype, backend: str | None = None) -> str:
    """The implementation `Attention` uses: "xla" or "cudnn" (cuDNN's fused attention: GPU, 16-bit, no
    soft-capping, head size a multiple of 8 up to 128). "auto" takes cuDNN where it applies; a requested
    "cudnn" that cannot serve this model falls back to "xla" with one log line."""
    if requested not in ATTENTION_IMPLS:
        raise ConfigError(f"model.attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, got {requested!r}")
    backend = backend or jax.default_backend()
    reasons = [why for bad, why in (
        (backend != "gpu", f"the backend is {backend}"),
        (jnp.dtype(compute_dtype).itemsize != 2, f"it computes in {jnp.dtype(compute_dtype).name}"),
        (config.attention_logit_softcapping is not None, "its attention scores are soft-capped"),
        (config.head_size % 8 or config.head_size > 128, f"its head size is {config.head_size}")) if bad]
    if requested == "xla" or (requested == "auto" and reasons):
        return "xla"
    if reasons:
        log.info("model.attention_impl='cudnn' cannot serve this model (%s); using XLA attention", "; ".join(reasons))
        return "xla"
    return "cudnn"


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, lora: LoRAConfig, param_dtype, quantize, rngs: nnx.Rngs,
                 attention_impl: str = "xla"):
        c = config
        self.attention_impl = attention_impl
        q_out, kv_out = c.n_head * c.head_size, c.n_query_groups * c.head_size
        qkv_bias = c.bias or c.attn_bias

        def mk(name, i, o, axes, target, bias):
            return Linear(i, o, axes=axes, use_bias=bias, param_dtype=param_dtype, quantize=quantize,
                          adapter=lora.adapter(f"blocks.attn.{name}", target), rngs=rngs)

        self.q = mk("q", c.n_embd, q_out, ("embed", "heads"), "query", qkv_bias)
        self.k = mk("k", c.n_embd, kv_out, ("embed", "kv_heads"), "key", qkv_bias)
        self.v = mk("v", c.n_embd, kv_out, ("embed", "kv_heads"), "value", qkv_bias)
        self.proj = mk("proj", q_out, c.n_embd, ("heads", "embed"), "projection", c.bias or c.attn_out_bias)
        self.n_head, self.n_kv, self.head_size = c.n_head, c.n_query_groups, c.head_size
        self.scale = c.attention_multiplier or 1.0 / math.sqrt(c.attention_scores_scalar or c.head_size)
        self.softcap = c.attention_logit_softcapping
        # QK-norm (before RoPE), without a bias: over each head with one weight ("head") or one per
        # head ("per_head"), or over the whole q / k projection ("full")
        self.qk_norm = c.qk_norm
        if c.qk_norm is not None:
            shapes = {"head": ((c.head_size,), (None,), (c.head_size,), (None,)),
                      "per_head": ((c.n_head, c.head_size), ("heads", None), (c.n_query_groups, c.head_size),
                                   ("kv_heads", None)),
                      "full": ((q_out,), ("heads",), (kv_out,), ("kv_heads",))}[c.qk_norm]
            self.q_norm = Norm(shapes[0], c, param_dtype, axes=shapes[1], bias=False)
            self.k_norm = Norm(shapes[2], c, param_dtype, axes=shapes[3], bias=False)

    def __call__(self, x, cos, sin, mask, keys, cache=None, index=None):
        """x [b, t, d] -> (y [b, t, d], new k/v or None); keys: 4 dropout keys or None.

        Without `cache` the tokens attend to each other: mask bool [b, 1, t, t] (True = may attend).
        With cache = (k, v) [b, s, n_kv, head_size] of this layer, this call's k/v are written at
        slots index..index+t-1 and the queries attend to all s slots (mask [b, 1, t, s]); returns
        this call's (k, v) [b, t, n_kv, head_size] in the cache dtype.
        """
        b, t, _ = x.shape
        k0, k1, k2, k3 = keys if keys is not None else (None,) * 4
        q, k = self.q(x, dropout_key=k0), self.k(x, dropout_key=k1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.reshape(b, t, self.n_head, self.head_size), k.reshape(b, t, self.n_kv, self.head_size)
        if self.qk_norm in ("head", "per_head"):
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v(x, dropout_key=k2).reshape(b, t, self.n_kv, self.head_size)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = None
        if cache is not None:
            new_kv = (k.astype(cache[0].dtype), v.astype(cache[1].dtype))
            k, v = (jax.lax.dynamic_update_slice_in_dim(c, n, index, axis=1).astype(q.dtype)
                    for c, n in zip(cache, new_kv))
        # Checkpointed: the backward pass recomputes the [b, heads, t, s] scores and probabilities
        # from q, k, v (as flash attention does) instead of keeping 2-3 such tensors per layer.
        y = packing.checkpoint(self._attention if self.softcap is None else self._softcapped_attention)(q, k, v, mask)
        return self.proj(y.reshape(b, t, self.n_head * self.head_size), dropout_key=k3), new_kv

    def _attention(self, q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=self.scale, implementation=self.attention_impl)

    def _softcapped_attention(self, q, k, v, mask):
        """Plain attention with tanh soft-capping of the scores (Gemma-2); scores in fp32.

        q [b, t, n_head, hs]; k, v [b, s, n_kv, hs]; mask [b, 1, t, s].
        """
        b, t, _, hs = q.shape
        q = q.reshape(b, t, self.n_kv, self.n_head // self.n_kv, hs)
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * self.scale
        scores = jnp.tanh(scores / self.softcap) * self.softcap
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        y = jnp.einsum("bkgts,bskh->btkgh", probs, v)
        return y.reshape(b, t, self.n_head, hs)


class MLP(nnx.Module):
    """GptNeoxMLP (fc -> gelu -> proj), LLaMAMLP (silu gate), GemmaMLP (gelu gate), LLaMAMoE (top-k experts).

    moe_dispatch: one of MOE_DISPATCH ("auto": `grouped.sparse_pays` decides per call shape)."""

    def __init__(self, config: ModelConfig, lora: LoRAConfig, param_dtype, quantize, rngs: nnx.Rngs,
                 moe_dispatch: str = "auto"):
        c = config
        self.kind = c.mlp_class
        self.moe_dispatch = moe_dispatch
        self.gelu_approximate = c.gelu_approximate
        experts = ((c.n_expert, "expert"),) if self.kind == "LLaMAMoE" else ()

        def mk(name, i, o, axes):
            return Linear(i, o, axes=axes, use_bias=c.bias, batch_dims=experts, param_dtype=param_dtype,
                          quantize=quantize, adapter=lora.adapter(f"blocks.mlp.{name}", "mlp"), rngs=rngs)

        if self.kind == "GptNeoxMLP":
            self.fc = mk("fc", c.n_embd, c.intermediate_size, ("embed", "mlp"))
        else:
            self.fc_1 = mk("fc_1", c.n_embd, c.intermediate_size, ("embed", "mlp"))  # gate
            self.fc_2 = mk("fc_2", c.n_embd, c.intermediate_size, ("embed", "mlp"))  # up
        self.proj = mk("proj", c.intermediate_size, c.n_embd, ("mlp", "embed"))
        if self.kind == "LLaMAMoE":
            bound = 1.0 / math.sqrt(c.n_embd)
            self.router = nnx.Param(jax.random.uniform(rngs.params(), (c.n_embd, c.n_expert), param_dtype,
                                                       -bound, bound), **logical_axes(("embed", None)))
            self.n_expert, self.top_k, self.norm_topk = c.n_expert, c.n_expert_per_token, c.moe_norm_topk

    def __call__(self, x, keys, token_weights=None):
        """x [b, t, d] -> (y [b, t, d], router statistics or None); keys: 3 dropout keys or None.

        token_weights fp32 [b, t] (1 for real tokens, 0 for padding): an MoE layer also returns its
        `grouped.router_statistics` over those tokens (for the load-balancing loss)."""
        k0, k1, k2 = keys if keys is not None else (None,) * 3
        if self.kind == "LLaMAMoE":
            tokens = x.shape[0] * x.shape[1]
            sparse = self.moe_dispatch == "sparse" or (
                self.moe_dispatch == "auto" and sparse_pays(tokens, self.n_expert, self.top_k))
            top_idx, top_w, probs = self._route(x)
            y = (self._moe_sparse if sparse else self._moe)(x, top_idx, top_w, k0, k1, k2)
            return y, None if token_weights is None else router_statistics(top_idx, probs, token_weights)
        # The activation is checkpointed: the backward pass recomputes it from the matmul
        # outputs instead of keeping its intermediates (2-4 more [b, t, intermediate] tensors per layer).
        if self.kind == "GptNeoxMLP":
            h = packing.checkpoint(self._gelu)(self.fc(x, dropout_key=k0))
        else:
            h = packing.checkpoint(self._gated)(self.fc_1(x, dropout_key=k0), self.fc_2(x, dropout_key=k1))
        return self.proj(h, dropout_key=k2), None

    def _gelu(self, h):
        return jax.nn.gelu(h, approximate=self.gelu_approximate)

    def _gated(self, gate, up):
        if self.kind == "GemmaMLP":
            return jax.nn.gelu(gate, approximate=self.gelu_approximate) * up
        return jax.nn.silu(gate) * up

    def _route(self, x):
        """Top-k routing: softmax over all experts' logits, top-k, renormalised or not (`moe_norm_topk`).
        x [b, t, d] -> (experts int [b, t, k], their weights fp32 [b, t, k], every expert's probability
        fp32 [b, t, E])."""
        router_logits = jnp.einsum("btd,de->bte", x, packing.from_storage(self.router[...]).astype(x.dtype),
                                   preferred_element_type=jnp.float32)
        top_logits, top_idx = jax.lax.top_k(router_logits, self.top_k)
        probs = jax.nn.softmax(router_logits, axis=-1)
        if self.norm_topk:  # softmax over the chosen experts = their softmax probabilities renormalised
            return top_idx, jax.nn.softmax(top_logits, axis=-1), probs
        # their probabilities under the softmax over all experts
        return top_idx, jnp.take_along_axis(probs, top_idx, axis=-1), probs

    def _moe(self, x, top_idx, top_w, k0, k1, k2):
        """Dense dispatch: every expert runs on every token and unchosen experts get weight 0. Exact and
        simple; n_expert / top_k times the FLOPs of sparse dispatch (the reference for `_moe_sparse`)."""
        weights = jnp.sum(jax.nn.one_hot(top_idx, self.n_expert) * top_w[..., None], axis=-2)  # [b, t, e]
        xe = jnp.broadcast_to(x[:, :, None, :], x.shape[:2] + (self.n_expert, x.shape[-1]))  # [b, t, e, d]
        h = self._gated(self.fc_1(xe, dropout_key=k0), self.fc_2(xe, dropout_key=k1))
        y = self.proj(h, dropout_key=k2)  # [b, t, e, d]
        return jnp.einsum("bted,bte->btd", y, weights.astype(y.dtype))

    def _moe_sparse(self, x, top_idx, top_w, k0, k1, k2):
        """Sparse dispatch: the b * t * top_k (token, expert) rows sorted by expert, each expert's matmuls one
        grouped matmul over its rows (`grouped.ExpertGroups`; LoRA on the experts as grouped low-rank
        products), scattered back onto the tokens with the routing weights. Exact: no capacity, no drops."""
        b, t, d = x.shape
        groups, order = ExpertGroups.sort(top_idx.reshape(-1), self.n_expert)
        token = order // self.top_k  # [b * t * k]: the token of each sorted row
        xs = x.reshape(b * t, d)[token]
        h = self._gated(self.fc_1(xs, dropout_key=k0, groups=groups), self.fc_2(xs, dropout_key=k1, groups=groups))
        y = self.proj(h, dropout_key=k2, groups=groups)  # [b * t * k, d]
        y = y * top_w.reshape(-1)[order][:, None].astype(y.dtype)
        return jnp.zeros((b * t, d), y.dtype).at[token].add(y).reshape(b, t, d)


class Block(nnx.Module):
    """Pre-norm (norm_1 / norm_2 on the inputs), optional post-norms on the attention and MLP outputs
    (both: Gemma 2/3; post only: OLMo 2), sequential or parallel residual (norm_2 None: shared norm)."""

    def __init__(self, config: ModelConfig, lora: LoRAConfig, param_dtype, quantize, rngs: nnx.Rngs,
                 attention_impl: str = "xla", moe_dispatch: str = "auto"):
        c = config
        self.parallel_residual = c.parallel_residual
        self.residual_multiplier = c.residual_multiplier
        self.norm_1 = Norm(c.n_embd, c, param_dtype) if c.pre_norm else None
        self.attn = Attention(c, lora, param_dtype, quantize, rngs, attention_impl)
        self.post_attention_norm = Norm(c.n_embd, c, param_dtype) if c.post_attention_norm else None
        self.norm_2 = None if c.shared_attention_norm or not c.pre_norm else Norm(c.n_embd, c, param_dtype)
        self.mlp = MLP(c, lora, param_dtype, quantize, rngs, moe_dispatch)
        self.post_mlp_norm = Norm(c.n_embd, c, param_dtype) if c.post_mlp_norm else None

    def __call__(self, x, cos, sin, mask, dropout_key=None, cache=None, index=None, token_weights=None):
        """x [b, t, d] -> (x [b, t, d], new k/v or None, router statistics or None); cache/index as in
        `Attention`, token_weights as in `MLP`."""
        keys = None if dropout_key is None else tuple(jax.random.split(dropout_key, 7))
        h = x if self.norm_1 is None else self.norm_1(x)
        attn, new_kv = self.attn(h, cos, sin, mask, None if keys is None else keys[:4], cache, index)
        attn = self._residual(attn, self.post_attention_norm)
        if self.parallel_residual:
            mlp_in = h if self.norm_2 is None else self.norm_2(x)
        else:
            x = x + attn
            mlp_in = x if self.norm_2 is None else self.norm_2(x)
        m, stats = self.mlp(mlp_in, None if keys is None else keys[4:], token_weights)
        m = self._residual(m, self.post_mlp_norm)
        return (x + attn + m if self.parallel_residual else x + m), new_kv, stats

    def _residual(self, y, post_norm):
        """A branch's output as added to the residual stream: post-normed, times the multiplier."""
        if post_norm is not None:
            y = post_norm(y)
        return y if self.residual_multiplier == 1.0 else y * jnp.asarray(self.residual_multiplier, y.dtype)


class GPT(nnx.Module):
    """input_ids int32 [b, t] -> logits fp32 [b, t, padded_vocab_size]."""

    def __init__(self, config: ModelConfig, lora: LoRAConfig = LoRAConfig(), *, param_dtype=jnp.float32,
                 compute_dtype=None, quantize: str | None = None, scan_layers: bool = True, remat: str = "none",
                 attention_impl: str = "auto", moe_dispatch: str = "auto", rngs: nnx.Rngs):
        """quantize: a `models.quant` format for every block's linear kernels (QLoRA); the embedding,
        norms, router and head stay in `param_dtype`. attention_impl: one of ATTENTION_IMPLS
        (`attention_implementation`). moe_dispatch: one of MOE_DISPATCH (`MLP`)."""
        if moe_dispatch not in MOE_DISPATCH:
            raise ConfigError(f"model.moe_dispatch must be one of {', '.join(MOE_DISPATCH)}, got {moe_dispatch!r}")
        c = config
        impl = attention_implementation(attention_impl, c, compute_dtype or param_dtype)
        self.config, self.lora, self.quantize = c, lora, quantize
        self.compute_dtype = jnp.dtype(compute_dtype or param_dtype)
        self.scan_layers, self.remat = scan_layers, remat
        self.wte = nnx.Param(0.02 * jax.random.normal(rngs.params(), (c.padded_vocab_size, c.n_embd), param_dtype),
                             **logical_axes(("vocab", "embed")))

        @nnx.split_rngs(splits=c.n_layer)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(c, lora, param_dtype, quantize, rngs, impl, moe_dispatch)

        self.blocks = make_blocks(rngs)
        self.ln_f = Norm(c.n_embd, c, param_dtype)
        self.lm_head = Linear(c.n_embd, c.padded_vocab_size, axes=("embed", "vocab"), use_bias=c.lm_head_bias,
                              param_dtype=param_dtype, tied=c.tie_embeddings, adapter=lora.adapter("lm_head", "head"),
                              rngs=rngs)
        if lora.use_dora:
            init_magnitudes(self)

    def __call__(self, input_ids, *, positions=None, attention_mask=None, dropout_key=None):
        return self.logits(self.hidden_states(input_ids, positions=positions, attention_mask=attention_mask,
                                              dropout_key=dropout_key))

    def hidden_states(self, input_ids, *, positions=None, attention_mask=None, segment_ids=None, dropout_key=None,
                      batch_sharding=None, router_aux: bool = False):
        """Final-norm hidden states [b, t, n_embd] in the compute dtype (with `router_aux`: and the
        load-balancing loss of the MoE routing over the real tokens, fp32 [], 0 without experts).

        attention_mask: [b, t], 1 for real tokens, 0 for padding (left or right). positions default
        to the count of real tokens before each one. segment_ids: int [b, t] instead, for packed rows:
        a token attends only to earlier tokens of its own segment (padding is a segment of its own)
        and positions restart at 0 in each segment. dropout_key enables LoRA dropout (training).
        batch_sharding: a sharding of the [b, t, n_embd] residual stream (batch split, width whole)
        imposed on the embedding output and on every block output, so that a mesh splits the batch
        and gathers weights rather than splitting the width (None: placement left to XLA).
        """
        b, t = input_ids.shape
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            positions = (jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0) if segment_ids is None
                         else segment_positions(segment_ids))
        weights = None
        if router_aux:
            weights = (valid if segment_ids is None else valid & (segment_ids > 0)).astype(jnp.float32)
        x, _, stats = self._blocks(input_ids, positions, jnp.arange(t), valid, dropout_key,
                                   batch_sharding=batch_sharding, segment_ids=segment_ids, token_weights=weights)
        if not router_aux:
            return self.ln_f(x)
        aux = jnp.zeros((), jnp.float32) if stats is None else load_balancing_loss(stats, jnp.sum(weights))
        return self.ln_f(x), aux

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty `KVCache` for `batch` rows of up to `max_len` tokens (dtype: default the compute dtype)."""
        c = self.config
        shape = (c.n_layer, batch, max_len, c.n_query_groups, c.head_size)
        dtype = dtype or self.compute_dtype
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), valid=jnp.zeros((batch, max_len), bool),
                       index=jnp.zeros((), jnp.int32))

    def forward_with_cache(self, input_ids, cache: KVCache, *, positions=None, attention_mask=None,
                           last_only: bool = False) -> tuple[jax.Array, KVCache]:
        """Run input_ids int32 [b, t] after the tokens already in `cache` -> (fp32 logits, new cache).

        The tokens go to slots cache.index..cache.index+t-1 (the caller keeps them < max_len).
        attention_mask [b, t]: 1 for real tokens, 0 for padding (left padding of a prompt batch).
        positions default to the count of real tokens before each one, cached ones included.
        Logits are [b, t, padded_vocab] or, with `last_only`, [b, 1, padded_vocab].
        """
        b, t = input_ids.shape
        new_valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            before = jnp.sum(cache.valid, axis=1, keepdims=True)
            positions = jnp.maximum(before + jnp.cumsum(new_valid, axis=1) - 1, 0)
        valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, new_valid, cache.index, axis=1)
        x, (new_k, new_v), _ = self._blocks(input_ids, positions, cache.index + jnp.arange(t), valid, None,
                                            (cache.k, cache.v), cache.index)
        hidden = self.ln_f(x[:, -1:] if last_only else x)
        k, v = (jax.lax.dynamic_update_slice_in_dim(c, n, cache.index, axis=2)
                for c, n in ((cache.k, new_k), (cache.v, new_v)))
        return self.logits(hidden), KVCache(k=k, v=v, valid=valid, index=cache.index + t)

    def _blocks(self, input_ids, positions, query_slots, key_valid, dropout_key, cache=None, index=None, *,
                batch_sharding=None, segment_ids=None, token_weights=None):
        """Embedding and all blocks -> (x [b, t, d] before the final norm, new k/v stacked over layers or None,
        router statistics stacked over layers or None: with `token_weights` [b, t], see `MLP`).

        query_slots int [t] and key_valid bool [b, s] define the masks (`attention_masks`); segment_ids
        [b, t] (no cache) also confine attention to each segment; cache: None, or (k, v)
        [n_layer, b, s, n_kv, hs] read one layer at a time by the scan.
        """
        c = self.config
        base_mask, distance = attention_masks(query_slots, key_valid)
        if segment_ids is not None:
            base_mask = base_mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        cos, sin, rope_kind = rope_tables(c, positions)

        constrain = ((lambda a: a) if batch_sharding is None else
                     (lambda a: jax.lax.with_sharding_constraint(a, batch_sharding)))
        x = self.wte[...][input_ids].astype(self.compute_dtype)
        if c.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(c.n_embd), self.compute_dtype)
        if c.embedding_multiplier != 1.0:
            x = x * jnp.asarray(c.embedding_multiplier, self.compute_dtype)
        x = constrain(x)

        windows = jnp.asarray([c.sliding_window_for_layer(i) or 0 for i in range(c.n_layer)], jnp.int32)
        layer_keys = None if dropout_key is None else jax.random.split(dropout_key, c.n_layer)
        graphdef, block_state = nnx.split(self.blocks)
        block_state = jax.tree.map(packing.to_storage, block_state)  # 16-bit weights as bits (see packing)

        def body(h, layer):
            state, window, kind, key, kv = layer
            mask = base_mask & ((window == 0) | (distance < window))
            layer_cos, layer_sin = (cos[0], sin[0]) if len(cos) == 1 else (cos[kind], sin[kind])
            h, new_kv, stats = nnx.merge(graphdef, state)(h, layer_cos, layer_sin, mask, key, kv, index, token_weights)
            return constrain(h), (new_kv, stats)

        if self.remat != "none":
            policy = None if self.remat == "block" else getattr(jax.checkpoint_policies, self.remat)
            body = jax.checkpoint(body, policy=policy, prevent_cse=not self.scan_layers)
        xs = (block_state, windows, jnp.asarray(rope_kind), layer_keys, cache)
        if self.scan_layers:
            x, (new_kv, stats) = jax.lax.scan(body, x, xs)
            return x, new_kv, stats
        outs = []
        for i in range(c.n_layer):
            x, out = body(x, jax.tree.map(lambda a: a[i], xs))
            outs.append(out)
        new_kv, stats = (None if outs[0][j] is None else jax.tree.map(lambda *a: jnp.stack(a), *(o[j] for o in outs))
                         for j in (0, 1))
        return x, new_kv, stats

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., n_embd] -> fp32 logits [..., padded_vocab_size] (final soft-capping applied)."""
        return _head_logits(self.lm_head, self.wte[...], self.config, hidden)

    def untie_head(self) -> None:
        """Give a tied head its own kernel, a copy of the embedding [n_embd, padded_vocab] (the model's outputs
        are unchanged; `config.tie_embeddings` becomes False, so an HF export writes lm_head.weight)."""
        if self.lm_head.kernel is not None:
            return
        self.lm_head.kernel = nnx.data(nnx.Param(self.wte[...].T, **logical_axes(("embed", "vocab"))))
        self.config = self.config.replace(tie_embeddings=False)

    def logits_head(self):
        """-> (apply, params): `apply(params, hidden)` computes `self.logits(hidden)` as a pure function
        of `params` (the head's variables and, for tied embeddings, the embedding), for losses that
        differentiate the head themselves (`training.step.cross_entropy_sum`). `apply` holds no arrays."""
        graphdef, state = nnx.split(self.lm_head)
        config = self.config
        tied = self.lm_head.kernel is None

        def apply(params, hidden):
            head_state, wte = params
            return _head_logits(nnx.merge(graphdef, head_state), wte, config, hidden)

        return apply, (state, self.wte[...] if tied else None)


def _head_logits(lm_head: Linear, wte: jax.Array | None, config: ModelConfig, hidden: jax.Array) -> jax.Array:
    # tied: the [vocab, embd] embedding is contracted as stored; a transposed view is copied whole
    # when it enters the loss-chunk loop (XLA gives loop operands the default layout)
    y = lm_head(hidden, tied_kernel=wte if lm_head.kernel is None else None, out_dtype=jnp.float32)
    if config.logits_scaling != 1.0:
        y = y / config.logits_scaling
    cap = config.final_logit_softcapping
    return jnp.tanh(y / cap) * cap if cap else y
