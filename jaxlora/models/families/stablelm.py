"""StableLM 2 and stablelm-3b-4e1t (HF `stablelm`): LayerNorm, partial rotary, SiLU-gated MLP, optional q/k/v
biases, per-head QK LayerNorm and parallel residual."""

from __future__ import annotations

from jaxlora.models.families import base
from jaxlora.models.families.base import Source


def from_hf(hf: dict) -> dict:
    base.require(hf, "hidden_act", ("silu",), "silu", "stablelm")
    n_head = hf["num_attention_heads"]
    parallel = bool(hf.get("use_parallel_residual", False))
    return dict(
        n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"], n_head=n_head,
        n_query_groups=hf.get("num_key_value_heads") or n_head, head_size=hf["hidden_size"] // n_head,
        intermediate_size=hf["intermediate_size"], block_size=hf.get("max_position_embeddings", 4096),
        norm_class="LayerNorm", norm_eps=hf.get("layer_norm_eps", 1e-5), rope_base=base.rope_base(hf),
        rope_scaling=base.rope_scaling(hf, "stablelm"),
        rotary_percentage=base.partial_rotary(hf, 0.25),
        attn_bias=bool(hf.get("use_qkv_bias", False)), qk_norm="per_head" if hf.get("qk_layernorm") else None,
        parallel_residual=parallel, shared_attention_norm=parallel,
    )


def to_hf(c) -> dict:
    return dict(num_key_value_heads=c.n_query_groups, intermediate_size=c.intermediate_size, hidden_act="silu",
                layer_norm_eps=c.norm_eps, partial_rotary_factor=c.rotary_percentage, use_qkv_bias=c.attn_bias,
                qk_layernorm=c.qk_norm == "per_head", use_parallel_residual=c.parallel_residual,
                **base.rope_scaling_hf(c))


def key_map(c) -> base.KeyMap:
    top, block = base.llama_keys(c)
    p = "model.layers.{i}."
    if c.parallel_residual:
        del block["norm_2"]
    if c.qk_norm:  # one LayerNorm per head, stacked on our leading heads axis
        for ours, theirs, heads in (("q_norm", "q_layernorm", c.n_head), ("k_norm", "k_layernorm", c.n_query_groups)):
            block["attn"][ours] = {"weight": Source((p + f"self_attn.{theirs}.norms.{{e}}.weight",), experts=heads)}
    return top, block


_rows = [dict(name="stablelm-2-1_6b", vocab_size=100289, padded_vocab_size=100352, n_layer=24, n_embd=2048,
              n_head=32, n_query_groups=32, intermediate_size=5632, block_size=4096, attn_bias=True),
         dict(name="stablelm-3b-4e1t", vocab_size=50304, padded_vocab_size=50304, n_layer=32, n_embd=2560, n_head=32,
              n_query_groups=32, intermediate_size=6912, block_size=4096)]

FAMILY = base.Family(model_types=("stablelm",), architecture="StableLmForCausalLM", from_hf=from_hf, to_hf=to_hf,
                     key_map=key_map,
                     presets=base.presets("stablelm", _rows, norm_class="LayerNorm", rotary_percentage=0.25))
