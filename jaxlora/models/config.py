"""ModelConfig: the architecture of a GPT-style model, named presets, and HF config.json import.

Field names follow LitGPT's `Config` where one exists (n_layer, n_head, n_query_groups, ...).
Presets are keyed by LitGPT's model names; `ModelConfig.from_hf_config` reads a checkpoint's
`config.json` and is what `load_model` uses, so presets matter only for planning and benchmarks.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from jaxlora.errors import CheckpointError

# HF `model_type` values that `from_hf_config` understands.
SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "mixtral", "qwen2", "phi", "phi3", "gemma", "gemma2", "falcon", "gpt_neox",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    model_type: str  # the HF `model_type`: selects the checkpoint key map
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
    post_attention_norm: bool = False  # Gemma-2: norm on the attention output
    post_mlp_norm: bool = False  # Gemma-2: norm on the MLP output
    # Attention
    rotary_percentage: float = 1.0
    rope_base: float = 10000.0
    rope_scaling: tuple[tuple[str, float], ...] | None = None  # Llama-3.1: factor, low/high_freq_factor, original_max_seq_len
    sliding_window_size: int | None = None
    sliding_window_layers: str = "all"  # "all" | "even" (Gemma-2: layers 0, 2, 4, ... slide)
    attention_scores_scalar: float | None = None  # query scale 1/sqrt(scalar); None: head_size
    attention_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    bias: bool = False  # bias on every attention and MLP linear
    attn_bias: bool = False  # bias on q, k, v only (Qwen2.5)
    # MLP
    mlp_class: str = "LLaMAMLP"  # "GptNeoxMLP" | "LLaMAMLP" | "GemmaMLP" | "LLaMAMoE"
    gelu_approximate: bool = False  # tanh approximation of GELU
    n_expert: int = 0
    n_expert_per_token: int = 0
    # Embedding / head
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(n_embd)
    tie_embeddings: bool = False
    lm_head_bias: bool = False

    def __post_init__(self):
        if self.head_size is None:
            object.__setattr__(self, "head_size", self.n_embd // self.n_head)

    @property
    def rope_n_elem(self) -> int:
        """How many leading dims of each head are rotated (partial rotary)."""
        return int(self.rotary_percentage * self.head_size)

    @property
    def rope_scaling_dict(self) -> dict[str, float] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def sliding_window_for_layer(self, layer: int) -> int | None:
        if self.sliding_window_size is None:
            return None
        if self.sliding_window_layers == "even" and layer % 2:
            return None
        return self.sliding_window_size

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise CheckpointError(
                f"unknown model name {name!r}; known names: {', '.join(sorted(PRESETS))}"
            )
        return PRESETS[name].replace(**overrides)

    @classmethod
    def from_hf_config(cls, source: str | os.PathLike | dict) -> "ModelConfig":
        """Build from an HF `config.json` (a path to the file or its directory, or the parsed dict)."""
        if isinstance(source, dict):
            hf = source
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise CheckpointError(f"no config.json found at {path}")
            with open(path) as f:
                hf = json.load(f)
        return _from_hf_dict(hf)


def _from_hf_dict(hf: dict) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"unsupported model_type {model_type!r} in config.json; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    name = hf.get("_name_or_path") or model_type
    vocab = hf["vocab_size"]
    common = dict(name=os.path.basename(str(name)), model_type=model_type, vocab_size=vocab,
                  padded_vocab_size=vocab, tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    rope_params = hf.get("rope_parameters") or {}
    rope_base = float(hf.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
    rope_scaling = hf.get("rope_scaling") or (rope_params if rope_params.get("rope_type") == "llama3" else None)
    partial_rotary = float(hf.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0)))

    if model_type in ("llama", "mistral", "mixtral", "qwen2", "phi3"):
        n_head = hf["num_attention_heads"]
        cfg = dict(
            n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"], n_head=n_head,
            n_query_groups=hf.get("num_key_value_heads") or n_head,
            head_size=hf.get("head_dim") or hf["hidden_size"] // n_head,
            intermediate_size=hf["intermediate_size"], block_size=hf.get("max_position_embeddings", 4096),
            norm_eps=hf.get("rms_norm_eps", 1e-5), rope_base=rope_base, rotary_percentage=partial_rotary,
            attn_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            bias=bool(hf.get("mlp_bias", False)),
        )
        if model_type == "llama" and rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "llama3":
            cfg["rope_scaling"] = tuple(sorted(
                (k, float(rope_scaling[k])) for k in
                ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")))
        elif rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise CheckpointError(f"unsupported rope_scaling {rope_scaling.get('rope_type', rope_scaling.get('type'))!r} "
                                  f"for model_type {model_type!r}; supported: llama3 (Llama-3.1/3.2)")
        window = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            window = None
        if window and window < cfg["block_size"]:
            cfg["sliding_window_size"] = int(window)
        if model_type == "mixtral":
            cfg.update(mlp_class="LLaMAMoE", n_expert=hf["num_local_experts"],
                       n_expert_per_token=hf["num_experts_per_tok"])
        return ModelConfig(**common, **cfg)

    if model_type in ("gemma", "gemma2"):
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        cfg = dict(
            n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"], n_head=hf["num_attention_heads"],
            n_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_size=hf["head_dim"],
            intermediate_size=hf["intermediate_size"], block_size=hf.get("max_position_embeddings", 8192),
            norm_eps=hf.get("rms_norm_eps", 1e-6), norm_unit_offset=True, rope_base=rope_base,
            mlp_class="GemmaMLP", gelu_approximate=act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"),
            scale_embeddings=True, attn_bias=bool(hf.get("attention_bias", False)),
        )
        common["tie_embeddings"] = bool(hf.get("tie_word_embeddings", True))
        if model_type == "gemma2":
            cfg.update(
                post_attention_norm=True, post_mlp_norm=True,
                attention_scores_scalar=hf.get("query_pre_attn_scalar", cfg["head_size"]),
                attention_logit_softcapping=hf.get("attn_logit_softcapping"),
                final_logit_softcapping=hf.get("final_logit_softcapping"),
            )
            if hf.get("sliding_window"):
                layer_types = hf.get("layer_types")
                expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg["n_layer"])]
                if layer_types is not None and list(layer_types) != expected:
                    raise CheckpointError("unsupported Gemma-2 layer_types: only alternating sliding/full "
                                          "attention starting with a sliding layer is supported")
                cfg.update(sliding_window_size=int(hf["sliding_window"]), sliding_window_layers="even")
        return ModelConfig(**common, **cfg)

    if model_type == "phi":
        act = hf.get("hidden_act", "gelu_new")
        return ModelConfig(
            **common, n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"],
            n_head=hf["num_attention_heads"],
            n_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"], block_size=hf.get("max_position_embeddings", 2048),
            norm_class="LayerNorm", norm_eps=hf.get("layer_norm_eps", 1e-5), parallel_residual=True,
            shared_attention_norm=True, rotary_percentage=partial_rotary, rope_base=rope_base,
            bias=True, mlp_class="GptNeoxMLP", gelu_approximate=act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"),
            lm_head_bias=True,
        )

    if model_type == "falcon":
        if hf.get("alibi"):
            raise CheckpointError("unsupported Falcon variant: ALiBi position encoding (alibi=true)")
        n_head = hf.get("num_attention_heads") or hf["n_head"]
        new_arch = bool(hf.get("new_decoder_architecture", False))
        if new_arch:
            kv = hf.get("num_kv_heads") or n_head
        else:
            kv = 1 if hf.get("multi_query", True) else n_head
        hidden = hf["hidden_size"]
        parallel = bool(hf.get("parallel_attn", True))
        n_norms = hf.get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
        common["tie_embeddings"] = bool(hf.get("tie_word_embeddings", True))
        return ModelConfig(
            **common, n_layer=hf.get("num_hidden_layers") or hf["n_layer"], n_embd=hidden, n_head=n_head,
            n_query_groups=kv, intermediate_size=hf.get("ffn_hidden_size") or 4 * hidden,
            block_size=hf.get("max_position_embeddings", 2048), norm_class="LayerNorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), parallel_residual=parallel,
            shared_attention_norm=parallel and n_norms == 1,
            rope_base=rope_base, bias=bool(hf.get("bias", False)), mlp_class="GptNeoxMLP",
        )

    # gpt_neox: Pythia, StableLM-Alpha
    act = hf.get("hidden_act", "gelu")
    return ModelConfig(
        **common, n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"], n_head=hf["num_attention_heads"],
        n_query_groups=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        block_size=hf.get("max_position_embeddings", 2048), norm_class="LayerNorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5), parallel_residual=bool(hf.get("use_parallel_residual", True)),
        rotary_percentage=float(hf.get("rotary_pct", rope_params.get("partial_rotary_factor", 0.25))),
        rope_base=float(hf.get("rotary_emb_base", rope_base)), bias=bool(hf.get("attention_bias", True)),
        mlp_class="GptNeoxMLP", gelu_approximate=act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"),
    )


# ---------------------------------------------------------------------------------------------
# Presets (LitGPT names and values).

PRESETS: dict[str, ModelConfig] = {}


def _add(**kw: Any) -> None:
    PRESETS[kw["name"]] = ModelConfig(**kw)


_LLAMA3_ROPE = lambda factor: (("factor", factor), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                               ("original_max_position_embeddings", 8192.0))
_llama = dict(model_type="llama", norm_class="RMSNorm", mlp_class="LLaMAMLP")
for _name, _l, _e, _h, _g, _i, _ctx in (
    ("Llama-2-7b-hf", 32, 4096, 32, 32, 11008, 4096),
    ("Llama-2-13b-hf", 40, 5120, 40, 40, 13824, 4096),
    ("Llama-2-70b-hf", 80, 8192, 64, 8, 28672, 4096),
):
    _add(name=_name, vocab_size=32000, padded_vocab_size=32000, n_layer=_l, n_embd=_e, n_head=_h,
         n_query_groups=_g, intermediate_size=_i, block_size=_ctx, **_llama)
for _name, _l, _e, _h, _g, _i, _ctx, _tie, _rope in (
    ("Meta-Llama-3-8B", 32, 4096, 32, 8, 14336, 8192, False, None),
    ("Meta-Llama-3-70B", 80, 8192, 64, 8, 28672, 8192, False, None),
    ("Llama-3.1-8B", 32, 4096, 32, 8, 14336, 131072, False, _LLAMA3_ROPE(8.0)),
    ("Llama-3.1-70B", 80, 8192, 64, 8, 28672, 131072, False, _LLAMA3_ROPE(8.0)),
    ("Llama-3.1-405B", 126, 16384, 128, 8, 53248, 131072, False, _LLAMA3_ROPE(8.0)),
    ("Llama-3.2-1B", 16, 2048, 32, 8, 8192, 131072, True, _LLAMA3_ROPE(32.0)),
    ("Llama-3.2-3B", 28, 3072, 24, 8, 8192, 131072, True, _LLAMA3_ROPE(32.0)),
):
    _add(name=_name, vocab_size=128000, padded_vocab_size=128256, n_layer=_l, n_embd=_e, n_head=_h,
         n_query_groups=_g, intermediate_size=_i, block_size=_ctx, rope_base=500000.0, tie_embeddings=_tie,
         rope_scaling=_rope, **_llama)
_add(name="TinyLlama-1.1B-intermediate-step-1431k-3T", vocab_size=32000, padded_vocab_size=32000, n_layer=22,
     n_embd=2048, n_head=32, n_query_groups=4, intermediate_size=5632, block_size=2048, **_llama)
_add(name="TinyLlama-1.1B-Chat-v1.0", vocab_size=32000, padded_vocab_size=32000, n_layer=22,
     n_embd=2048, n_head=32, n_query_groups=4, intermediate_size=5632, block_size=2048, **_llama)

_mistral = dict(model_type="mistral", vocab_size=32000, padded_vocab_size=32000, n_layer=32, n_embd=4096,
                n_head=32, n_query_groups=8, intermediate_size=14336, **{k: v for k, v in _llama.items() if k != "model_type"})
_add(name="Mistral-7B-v0.1", block_size=4096, sliding_window_size=4096, **_mistral)
_add(name="Mistral-7B-Instruct-v0.1", block_size=4096, sliding_window_size=4096, **_mistral)
_add(name="Mistral-7B-v0.2", block_size=32768, rope_base=1000000.0, **_mistral)
_add(name="Mistral-7B-Instruct-v0.2", block_size=32768, rope_base=1000000.0, **_mistral)
_add(name="Mixtral-8x7B-v0.1", model_type="mixtral", vocab_size=32000, padded_vocab_size=32000, n_layer=32,
     n_embd=4096, n_head=32, n_query_groups=8, intermediate_size=14336, block_size=32768, rope_base=1000000.0,
     mlp_class="LLaMAMoE", n_expert=8, n_expert_per_token=2)
_add(name="Mixtral-8x22B-v0.1", model_type="mixtral", vocab_size=32768, padded_vocab_size=32768, n_layer=56,
     n_embd=6144, n_head=48, n_query_groups=8, intermediate_size=16384, block_size=65536, rope_base=1000000.0,
     mlp_class="LLaMAMoE", n_expert=8, n_expert_per_token=2)

_add(name="phi-2", model_type="phi", vocab_size=50257, padded_vocab_size=51200, n_layer=32, n_embd=2560,
     n_head=32, n_query_groups=32, intermediate_size=10240, block_size=2048, rotary_percentage=0.4,
     norm_class="LayerNorm", parallel_residual=True, shared_attention_norm=True, bias=True,
     mlp_class="GptNeoxMLP", gelu_approximate=True, lm_head_bias=True)
_add(name="phi-1_5", model_type="phi", vocab_size=50257, padded_vocab_size=51200, n_layer=24, n_embd=2048,
     n_head=32, n_query_groups=32, intermediate_size=8192, block_size=2048, rotary_percentage=0.5,
     norm_class="LayerNorm", parallel_residual=True, shared_attention_norm=True, bias=True,
     mlp_class="GptNeoxMLP", gelu_approximate=True, lm_head_bias=True)
_add(name="Phi-3-mini-4k-instruct", model_type="phi3", vocab_size=32000, padded_vocab_size=32064, n_layer=32,
     n_embd=3072, n_head=32, n_query_groups=32, intermediate_size=8192, block_size=4096)

_gemma = dict(vocab_size=256000, padded_vocab_size=256000, head_size=256, norm_eps=1e-6, norm_unit_offset=True,
              mlp_class="GemmaMLP", gelu_approximate=True, scale_embeddings=True, tie_embeddings=True)
_add(name="gemma-2b", model_type="gemma", n_layer=18, n_embd=2048, n_head=8, n_query_groups=1,
     intermediate_size=16384, block_size=8192, **_gemma)
_add(name="gemma-7b", model_type="gemma", n_layer=28, n_embd=3072, n_head=16, n_query_groups=16,
     intermediate_size=24576, block_size=8192, **_gemma)
_gemma2 = dict(model_type="gemma2", block_size=8192, post_attention_norm=True, post_mlp_norm=True,
               attention_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window_size=4096,
               sliding_window_layers="even", **_gemma)
_add(name="gemma-2-2b", n_layer=26, n_embd=2304, n_head=8, n_query_groups=4, intermediate_size=9216,
     attention_scores_scalar=256, **_gemma2)
_add(name="gemma-2-9b", n_layer=42, n_embd=3584, n_head=16, n_query_groups=8, intermediate_size=14336,
     attention_scores_scalar=256, **_gemma2)
_add(name="gemma-2-27b", n_layer=46, n_embd=4608, n_head=32, n_query_groups=16, head_size=128,
     intermediate_size=36864, attention_scores_scalar=144, **{k: v for k, v in _gemma2.items() if k != "head_size"})

_add(name="falcon-7b", model_type="falcon", vocab_size=65024, padded_vocab_size=65024, n_layer=32, n_embd=4544,
     n_head=71, n_query_groups=1, intermediate_size=18176, block_size=2048, norm_class="LayerNorm",
     parallel_residual=True, shared_attention_norm=True, mlp_class="GptNeoxMLP")
_add(name="falcon-40b", model_type="falcon", vocab_size=65024, padded_vocab_size=65024, n_layer=60, n_embd=8192,
     n_head=128, n_query_groups=8, intermediate_size=32768, block_size=2048, norm_class="LayerNorm",
     parallel_residual=True, mlp_class="GptNeoxMLP")

_neox = dict(model_type="gpt_neox", norm_class="LayerNorm", parallel_residual=True, bias=True,
             mlp_class="GptNeoxMLP", rotary_percentage=0.25)
_add(name="stablelm-base-alpha-3b", vocab_size=50254, padded_vocab_size=50688, n_layer=16, n_embd=4096,
     n_head=32, n_query_groups=32, intermediate_size=16384, block_size=4096, **_neox)
_add(name="stablelm-base-alpha-7b", vocab_size=50254, padded_vocab_size=50432, n_layer=16, n_embd=6144,
     n_head=48, n_query_groups=48, intermediate_size=24576, block_size=4096, **_neox)
for _name, _l, _e, _h, _ctx, _pad in (
    ("pythia-14m", 6, 128, 4, 512, 50304), ("pythia-31m", 6, 256, 8, 1024, 50304),
    ("pythia-70m", 6, 512, 8, 2048, 50304), ("pythia-160m", 12, 768, 12, 2048, 50304),
    ("pythia-410m", 24, 1024, 16, 2048, 50304), ("pythia-1b", 16, 2048, 8, 2048, 50304),
    ("pythia-1.4b", 24, 2048, 16, 2048, 50304), ("pythia-2.8b", 32, 2560, 32, 2048, 50304),
    ("pythia-6.9b", 32, 4096, 32, 2048, 50432), ("pythia-12b", 36, 5120, 40, 2048, 50688),
):
    _add(name=_name, vocab_size=50254, padded_vocab_size=_pad, n_layer=_l, n_embd=_e, n_head=_h,
         n_query_groups=_h, intermediate_size=4 * _e, block_size=_ctx, **_neox)

for _name, _l, _e, _h, _g, _i, _ctx, _tie in (
    ("Qwen2.5-0.5B", 24, 896, 14, 2, 4864, 32768, True),
    ("Qwen2.5-1.5B", 28, 1536, 12, 2, 8960, 131072, True),
    ("Qwen2.5-3B", 36, 2048, 16, 2, 11008, 32768, True),
    ("Qwen2.5-7B", 28, 3584, 28, 4, 18944, 131072, False),
    ("Qwen2.5-14B", 48, 5120, 40, 8, 13824, 131072, False),
    ("Qwen2.5-32B", 64, 5120, 40, 8, 27648, 131072, False),
    ("Qwen2.5-72B", 80, 8192, 64, 8, 29568, 131072, False),
):
    _add(name=_name, model_type="qwen2", vocab_size=151643, padded_vocab_size=151936, n_layer=_l, n_embd=_e,
         n_head=_h, n_query_groups=_g, intermediate_size=_i, block_size=_ctx, rope_base=1000000.0,
         norm_eps=1e-6, attn_bias=True, tie_embeddings=_tie)
