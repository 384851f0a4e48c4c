"""ModelConfig: the architecture of a GPT-style model, as the shared blocks of `models/gpt.py` implement it.

Field names follow LitGPT's `Config` where one exists (n_layer, n_head, n_query_groups, ...).
`ModelConfig.from_hf_config` reads a checkpoint's `config.json` through its family
(`models/families`), and is what `load_model` uses; `ModelConfig.from_name` gives a family's
preset (LitGPT's model names), which matter only for planning and benchmarks.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from jaxlora import storage
from jaxlora.errors import CheckpointError

@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    model_type: str  # the HF `model_type`: selects the family (`models.families`)
    vocab_size: int  # tokens the tokenizer can produce
    padded_vocab_size: int  # rows of the embedding / columns of the logits (>= vocab_size)
    n_layer: int
    n_embd: int
    n_head: int
    n_query_groups: int  # key/value heads: n_head = MHA, 1 = MQA, otherwise GQA
    intermediate_size: int
    head_size: int | None = None  # None: n_embd // n_head
    block_size: int = 4096  # maximum context length
    # Normalisation
    norm_class: str = "RMSNorm"  # "RMSNorm" | "LayerNorm"
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # Gemma: scale by (1 + weight)
    # Residual layout
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x))
    shared_attention_norm: bool = False  # parallel residual with norm2 == norm1
    pre_norm: bool = True  # norms on the block inputs (False: OLMo 2, post-norms only)
    post_attention_norm: bool = False  # Gemma-2/3, OLMo 2: norm on the attention output
    post_mlp_norm: bool = False  # Gemma-2/3, OLMo 2: norm on the MLP output
    residual_multiplier: float = 1.0  # Granite: x + multiplier * attn(...), likewise the MLP
    # Attention
    rotary_percentage: float = 1.0
    rope_base: float = 10000.0
    rope_scaling: tuple[tuple[str, object], ...] | None = None  # `models.rope.parse_rope_scaling`'s canonical form
    rope_local_base: float | None = None  # Gemma 3: RoPE base of sliding layers (unscaled); None: as global
    nope_layers: tuple[int, ...] = ()  # SmolLM3: layers without RoPE
    sliding_window_size: int | None = None
    # "global" | "sliding" per layer, as a pattern repeated over the layers (Gemma 2: sliding, global); None:
    # every layer "sliding" when sliding_window_size is set, else "global". Stored in its shortest form.
    attention_types: tuple[str, ...] | None = None
    attention_scores_scalar: float | None = None  # query scale 1/sqrt(scalar); None: head_size
    attention_multiplier: float | None = None  # Granite: the query scale itself (overrides the above)
    qk_norm: str | None = None  # None | "head" (one [head_size] weight) | "per_head" ([heads, head_size]) | "full" (q/k projection)
    attention_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    bias: bool = False  # bias on every attention and MLP linear
    attn_bias: bool = False  # bias on q, k, v (Qwen2.5; Llama's attention_bias with attn_out_bias)
    attn_out_bias: bool = False  # bias on the attention output projection
    # MLP
    mlp_class: str = "LLaMAMLP"  # "GptNeoxMLP" | "LLaMAMLP" | "GemmaMLP" | "LLaMAMoE"
    gelu_approximate: bool = False  # tanh approximation of GELU
    n_expert: int = 0
    n_expert_per_token: int = 0
    moe_norm_topk: bool = True  # renormalise the chosen experts' weights (Mixtral); False: softmax over all (Qwen3-MoE)
    # Embedding / head
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(n_embd)
    embedding_multiplier: float = 1.0  # Granite: embeddings times this
    logits_scaling: float = 1.0  # Granite: logits divided by this
    tie_embeddings: bool = False
    lm_head_bias: bool = False

    def __post_init__(self):
        if self.head_size is None:
            object.__setattr__(self, "head_size", self.n_embd // self.n_head)
        object.__setattr__(self, "attention_types", self._shortest_attention_types())
        if any(not 0 <= i < self.n_layer for i in self.nope_layers):
            raise ValueError(f"nope_layers {self.nope_layers} name layers outside 0..{self.n_layer - 1}")

    @property
    def rope_n_elem(self) -> int:
        """How many leading dims of each head are rotated (partial rotary)."""
        return int(self.rotary_percentage * self.head_size)

    def attention_type(self, layer: int) -> str:
        if self.attention_types is not None:
            return self.attention_types[layer % len(self.attention_types)]
        return "global" if self.sliding_window_size is None else "sliding"

    def _shortest_attention_types(self) -> tuple[str, ...] | None:
        """attention_types as the shortest pattern that gives the same layers (None when it is the default)."""
        if self.attention_types is None:
            return None
        unknown = set(self.attention_types) - {"global", "sliding"}
        if unknown:
            raise ValueError(f"attention_types may hold 'global' and 'sliding', not {sorted(unknown)}")
        types = tuple(self.attention_types[i % len(self.attention_types)] for i in range(self.n_layer))
        if set(types) == {"global" if self.sliding_window_size is None else "sliding"}:
            return None
        period = next(p for p in range(1, self.n_layer + 1) if all(types[i] == types[i % p] for i in range(self.n_layer)))
        return types[:period]

    def sliding_window_for_layer(self, layer: int) -> int | None:
        return self.sliding_window_size if self.attention_type(layer) == "sliding" else None

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A preset (LitGPT's model name) of any family, with `overrides` replaced."""
        from jaxlora.models.families import PRESETS

        if name not in PRESETS:
            raise CheckpointError(
                f"unknown model name {name!r}; known names: {', '.join(sorted(PRESETS))}"
            )
        return PRESETS[name].replace(**overrides)

    @classmethod
    def from_hf_config(cls, source: str | os.PathLike | dict) -> "ModelConfig":
        """Build from an HF `config.json` (a path to the file or its directory, a checkpoint URL as
        `storage.local_checkpoint` takes, or the parsed dict)."""
        if isinstance(source, dict):
            hf = source
        else:
            path = os.fspath(storage.local_checkpoint(source, weights=False) if storage.is_url(source) else source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise CheckpointError(f"no config.json found at {path}")
            with open(path) as f:
                try:
                    hf = json.load(f)
                except ValueError as e:
                    raise CheckpointError(f"{path} is not valid JSON ({e})") from None
            if not isinstance(hf, dict):
                raise CheckpointError(f"{path} must hold a JSON object, not a {type(hf).__name__}")
        from jaxlora.models.families import config_from_hf

        return config_from_hf(hf)
