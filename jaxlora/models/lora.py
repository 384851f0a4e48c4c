"""Which layers get which adapter: `LoRAConfig`, and the model-level LoRA operations.

The adapter itself is `models.adapters.LoRA`, attached to a frozen `models.linear.Linear`; this module
decides each layer's rank and scale from the config (LitGPT's six switches, or a regex over module
paths as PEFT's `target_modules`, with PEFT's `rank_pattern`), separates the trainable params
(`split_lora`), folds adapters into kernels (`merge_lora`) and counts them.

Module paths are dotted attribute paths with the layer index left out (blocks are stacked, so every
layer has the same adapters): "blocks.attn.q", "blocks.attn.k", "blocks.attn.v", "blocks.attn.proj",
"blocks.mlp.fc_1" (gate), "blocks.mlp.fc_2" (up), "blocks.mlp.fc" (GPT-NeoX/Phi), "blocks.mlp.proj",
"lm_head".
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.errors import ConfigError
from jaxlora.models.adapters import DoRA, LoRA
from jaxlora.models.linear import Linear, linear_layers, logical_axes

LORA_TARGETS = ("query", "key", "value", "projection", "mlp", "head")


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
    use_dora: bool = False  # weight-decomposed LoRA (`models.adapters.DoRA`)
    target_pattern: str | None = None  # a regex over module paths; when set it alone picks the adapted layers
    rank_pattern: tuple[tuple[str, int], ...] = ()  # (regex, rank): a path ending in a match gets that rank

    def __post_init__(self):
        object.__setattr__(self, "rank_pattern", tuple((str(k), int(v)) for k, v in self.rank_pattern))
        if self.r < 0:
            raise ConfigError(f"lora_r must be >= 0 (0 disables LoRA), got {self.r}")
        if self.r > 0 and self.alpha <= 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.dropout}")
        for pattern in (self.target_pattern,) + tuple(k for k, _ in self.rank_pattern):
            if pattern is not None:
                _compile(pattern)
        for pattern, rank in self.rank_pattern:
            if rank < 1:
                raise ConfigError(f"lora_rank_pattern gives {pattern!r} rank {rank}; ranks must be >= 1")

    def scale_for(self, rank: int) -> float:
        """alpha / rank (alpha / sqrt(rank) with rsLoRA); 0 for no adapter."""
        if rank == 0:
            return 0.0
        return self.alpha / (math.sqrt(rank) if self.use_rslora else rank)

    @property
    def scale(self) -> float:
        return self.scale_for(self.r)

    def rank_at(self, path: str, target: str) -> int:
        """The rank of the adapter on the layer at `path` (see the module docstring), whose LitGPT
        switch is `target` (one of LORA_TARGETS); 0: no adapter."""
        if not self.r:
            return 0
        on = (_compile(self.target_pattern).fullmatch(path) is not None if self.target_pattern is not None
              else getattr(self, target))
        if not on:
            return 0
        for pattern, rank in self.rank_pattern:
            if re.fullmatch(rf"(.*\.)?({pattern})", path):
                return rank
        return self.r

    def adapter(self, path: str, target: str):
        """A builder of the adapter for `Linear(..., adapter=...)` at `path`, or None."""
        rank = self.rank_at(path, target)
        if not rank:
            return None
        return functools.partial(DoRA if self.use_dora else LoRA, rank=rank, scale=self.scale_for(rank),
                                 dropout=self.dropout)

    @property
    def targets(self) -> tuple[str, ...]:
        """The LitGPT switches that are on (none with a path pattern, which decides alone)."""
        if not self.r or self.target_pattern is not None:
            return ()
        return tuple(t for t in LORA_TARGETS if getattr(self, t))

    @property
    def enabled(self) -> bool:
        """Whether any layer can get an adapter."""
        return bool(self.r) and (self.target_pattern is not None or any(getattr(self, t) for t in LORA_TARGETS))


@functools.lru_cache(maxsize=None)
def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"the LoRA path pattern {pattern!r} is not a valid regular expression ({e})") from None


def lora_layers(model: nnx.Module) -> Iterator[tuple[tuple, Linear]]:
    """(path, layer) for every `Linear` of the model that carries an adapter."""
    for path, layer in linear_layers(model):
        if layer.adapter is not None:
            yield path, layer


def init_magnitudes(model: nnx.Module) -> None:
    """Set every DoRA magnitude to its layer's column norms (after the frozen weights are in place).

    Stacked block layers are done one layer at a time (`lax.map`), so no more than one layer's kernel
    is ever dequantised or upcast to fp32."""
    for path, layer in lora_layers(model):
        if not isinstance(layer.adapter, DoRA):
            continue
        tied = model.wte[...] if layer.kernel is None else None
        if path[0] != "blocks":
            layer.adapter.init_magnitude(layer.weight(jnp.float32, tied))
            continue
        graphdef, state = nnx.split(layer)

        def column_norm(state):
            one = nnx.merge(graphdef, state)
            return one.adapter.column_norm(one.weight(jnp.float32))

        layer.adapter.magnitude[...] = jax.jit(lambda state: jax.lax.map(column_norm, state))(state)


def split_lora(model: nnx.Module):
    """-> (graphdef, lora_params, base_params): two separate pytrees.

    `lora_params` holds every `nnx.LoRAParam` (trainable), `base_params` everything else (frozen).
    `nnx.merge(graphdef, lora_params, base_params)` rebuilds the model.
    """
    return nnx.split(model, nnx.LoRAParam, ...)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of `model` with every adapter folded into its kernel and removed, and every quantized
    kernel dequantised (to the layer's param dtype): a plain float model.

    The copy holds no LoRA params and gives the same outputs as `model` in eval mode (up to the
    rounding of the merged kernel to its dtype). An adapter on a tied head unties it: the copy's head
    has its own kernel (config.tie_embeddings False).
    """
    merged = nnx.clone(model)
    for path, layer in list(linear_layers(merged)):
        if layer.adapter is not None and layer.kernel is None:  # a head adapter on tied embeddings: the head
            # gets its own (merged) kernel, as PEFT does when it merges such an adapter; the embedding stays
            if not hasattr(merged, "untie_head"):
                raise ConfigError(f"cannot merge the LoRA adapter of {'/'.join(map(str, path))}: its kernel is "
                                  "another layer's")
            merged.untie_head()
        if layer.quantized:
            axes = getattr(layer.kernel, layer.kernel.names[0]).get_metadata()["out_sharding"]  # the kernel's
            w = layer.weight(jnp.float32)
            if layer.adapter is not None:
                w = layer.adapter.merge(w)
            layer.kernel = nnx.data(nnx.Param(w.astype(layer.param_dtype), **logical_axes(axes)))
        elif layer.adapter is not None:
            layer.kernel[...] = layer.adapter.merge(layer.kernel[...])
        layer.adapter = None
    if hasattr(merged, "lora"):
        merged.lora = LoRAConfig()
    if hasattr(merged, "quantize"):
        merged.quantize = None
    return merged


def count_lora_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
