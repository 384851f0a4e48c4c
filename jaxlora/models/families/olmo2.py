"""OLMo 2 (HF `olmo2`): Llama with post-norms only (no pre-norms) and QK-norm over the whole q / k projection."""

from __future__ import annotations

from jaxlora.models.families import base


def from_hf(hf: dict) -> dict:
    bias = bool(hf.get("attention_bias", False))
    return dict(base.llama_fields(hf, "olmo2"), qk_norm="full", pre_norm=False, post_attention_norm=True,
                post_mlp_norm=True, attn_bias=bias, attn_out_bias=bias)


def to_hf(c) -> dict:
    return dict(base.llama_hf(c), attention_bias=c.attn_bias)


def key_map(c) -> base.KeyMap:
    top, block = base.llama_keys(c)
    p = "model.layers.{i}."
    del block["norm_1"], block["norm_2"]
    block["attn"].update(q_norm=base.norm(p + "self_attn.q_norm"), k_norm=base.norm(p + "self_attn.k_norm"))
    block.update(post_attention_norm=base.norm(p + "post_attention_layernorm"),
                 post_mlp_norm=base.norm(p + "post_feedforward_layernorm"))
    return top, block


_rows = [dict(name="OLMo-2-0425-1B", n_layer=16, n_embd=2048, n_head=16, n_query_groups=16, intermediate_size=8192,
              rope_base=500000.0),
         dict(name="OLMo-2-1124-7B", n_layer=32, n_embd=4096, n_head=32, n_query_groups=32, intermediate_size=11008,
              rope_base=500000.0)]

FAMILY = base.Family(model_types=("olmo2",), architecture="Olmo2ForCausalLM", from_hf=from_hf, to_hf=to_hf,
                     key_map=key_map,
                     presets=base.presets("olmo2", _rows, vocab_size=100278, padded_vocab_size=100352, block_size=4096,
                                          norm_eps=1e-6, qk_norm="full", pre_norm=False, post_attention_norm=True,
                                          post_mlp_norm=True))
