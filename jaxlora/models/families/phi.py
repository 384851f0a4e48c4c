"""Phi-1.5 / Phi-2 (HF `phi`): parallel residual with one shared LayerNorm, partial rotary, GELU MLP."""

from __future__ import annotations

from jaxlora.models.families import base
from jaxlora.models.families.base import Source, linear, norm


def from_hf(hf: dict) -> dict:
    base.refuse_true(hf, "phi", "qk_layernorm")
    return dict(
        n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"], n_head=hf["num_attention_heads"],
        n_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"], block_size=hf.get("max_position_embeddings", 2048),
        norm_class="LayerNorm", norm_eps=hf.get("layer_norm_eps", 1e-5), parallel_residual=True,
        shared_attention_norm=True,
        rotary_percentage=base.partial_rotary(hf, 0.5),
        rope_base=base.rope_base(hf), rope_scaling=base.rope_scaling(hf, "phi"), bias=True, mlp_class="GptNeoxMLP",
        gelu_approximate=base.gelu_approximate(hf.get("hidden_act", "gelu_new"), "phi"), lm_head_bias=True,
    )


def to_hf(c) -> dict:
    return dict(num_key_value_heads=c.n_query_groups, intermediate_size=c.intermediate_size,
                hidden_act="gelu_new" if c.gelu_approximate else "gelu", layer_norm_eps=c.norm_eps,
                partial_rotary_factor=c.rotary_percentage, qk_layernorm=False, **base.rope_scaling_hf(c))


def key_map(c) -> base.KeyMap:
    p = "model.layers.{i}."
    attn = {x: linear(p + f"self_attn.{x}_proj") for x in "qkv"}
    attn["proj"] = linear(p + "self_attn.dense")
    block = {"norm_1": norm(p + "input_layernorm"), "attn": attn,
             "mlp": {"fc": linear(p + "mlp.fc1"), "proj": linear(p + "mlp.fc2")}}
    return {"wte": Source(("model.embed_tokens.weight",)), "ln_f": norm("model.final_layernorm"),
            "lm_head": linear("lm_head")}, block


_shared = dict(vocab_size=50257, padded_vocab_size=51200, n_head=32, block_size=2048, norm_class="LayerNorm",
               parallel_residual=True, shared_attention_norm=True, bias=True, mlp_class="GptNeoxMLP",
               gelu_approximate=True, lm_head_bias=True)
_rows = [dict(name="phi-2", n_layer=32, n_embd=2560, n_query_groups=32, intermediate_size=10240, rotary_percentage=0.4),
         dict(name="phi-1_5", n_layer=24, n_embd=2048, n_query_groups=32, intermediate_size=8192, rotary_percentage=0.5)]

FAMILY = base.Family(model_types=("phi",), architecture="PhiForCausalLM", from_hf=from_hf, to_hf=to_hf,
                     key_map=key_map, presets=base.presets("phi", _rows, **_shared))
