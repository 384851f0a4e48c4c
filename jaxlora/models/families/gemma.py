"""Gemma 1 (HF `gemma`): Llama layout, GELU-gated MLP, RMSNorm scaled by 1 + weight, scaled embeddings."""

from __future__ import annotations

from jaxlora.models.families import base


def gemma_fields(hf: dict, family: str, act: str) -> dict:
    """The fields Gemma 1, 2 and 3 share; act: the MLP's HF activation name."""
    base.refuse_true(hf, family, "use_bidirectional_attention")
    return dict(
        n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"], n_head=hf["num_attention_heads"],
        n_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_size=hf["head_dim"],
        intermediate_size=hf["intermediate_size"], block_size=hf.get("max_position_embeddings", 8192),
        norm_eps=hf.get("rms_norm_eps", 1e-6), norm_unit_offset=True, rope_base=base.rope_base(hf),
        mlp_class="GemmaMLP", gelu_approximate=base.gelu_approximate(act, family), scale_embeddings=True,
        attn_bias=bool(hf.get("attention_bias", False)), attn_out_bias=bool(hf.get("attention_bias", False)),
    )


def gemma_hf(c) -> dict:
    act = "gelu_pytorch_tanh" if c.gelu_approximate else "gelu"
    return dict(num_key_value_heads=c.n_query_groups, head_dim=c.head_size, intermediate_size=c.intermediate_size,
                hidden_act=act, hidden_activation=act, rms_norm_eps=c.norm_eps, attention_bias=c.attn_bias)


def from_hf(hf: dict) -> dict:
    # transformers' Gemma 1 reads hidden_act (not hidden_activation) and takes its legacy value "gelu",
    # which the Gemma v1.0 repos give, to mean the tanh approximation (as Gemma's reference code does)
    act = hf.get("hidden_act") or "gelu_pytorch_tanh"
    act = "gelu_pytorch_tanh" if act == "gelu" else act
    return dict(gemma_fields(hf, "gemma", act), rope_scaling=base.rope_scaling(hf, "gemma"))


def to_hf(c) -> dict:
    return dict(gemma_hf(c), **base.rope_scaling_hf(c))


_shared = dict(vocab_size=256000, padded_vocab_size=256000, head_size=256, norm_eps=1e-6, norm_unit_offset=True,
               mlp_class="GemmaMLP", gelu_approximate=True, scale_embeddings=True, tie_embeddings=True, block_size=8192)
_rows = [dict(name="gemma-2b", n_layer=18, n_embd=2048, n_head=8, n_query_groups=1, intermediate_size=16384),
         dict(name="gemma-7b", n_layer=28, n_embd=3072, n_head=16, n_query_groups=16, intermediate_size=24576)]

FAMILY = base.Family(model_types=("gemma",), architecture="GemmaForCausalLM", from_hf=from_hf, to_hf=to_hf,
                     key_map=base.llama_keys, tie_default=True, presets=base.presets("gemma", _rows, **_shared))
