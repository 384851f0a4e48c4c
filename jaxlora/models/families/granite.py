"""Granite 3.x (HF `granite`): Llama with embedding, attention, residual multipliers and logits scaling."""

from __future__ import annotations

from jaxlora.models.families import base


def from_hf(hf: dict) -> dict:
    bias = bool(hf.get("attention_bias", False))
    fields = base.llama_fields(hf, "granite", eps_default=1e-6)
    fields["head_size"] = hf["hidden_size"] // hf["num_attention_heads"]  # transformers' Granite ignores head_dim
    return dict(fields, attn_bias=bias, attn_out_bias=bias, bias=bool(hf.get("mlp_bias", False)),
                embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
                attention_multiplier=float(hf.get("attention_multiplier", 1.0)),
                residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
                logits_scaling=float(hf.get("logits_scaling", 1.0)))


def to_hf(c) -> dict:
    return dict(base.llama_hf(c), attention_bias=c.attn_bias, mlp_bias=c.bias,
                embedding_multiplier=c.embedding_multiplier, attention_multiplier=c.attention_multiplier,
                residual_multiplier=c.residual_multiplier, logits_scaling=c.logits_scaling)


_rows = [dict(name="granite-3.3-2b-base", n_layer=40, n_embd=2048, n_head=32, n_query_groups=8, intermediate_size=8192,
              logits_scaling=8.0),
         dict(name="granite-3.3-8b-base", n_layer=40, n_embd=4096, n_head=32, n_query_groups=8, intermediate_size=12800,
              logits_scaling=16.0)]

FAMILY = base.Family(model_types=("granite",), architecture="GraniteForCausalLM", from_hf=from_hf, to_hf=to_hf,
                     key_map=base.llama_keys,
                     presets=base.presets("granite", _rows, vocab_size=49159, padded_vocab_size=49159,
                                          block_size=131072, rope_base=10000000.0, norm_eps=1e-5, tie_embeddings=True,
                                          embedding_multiplier=12.0, attention_multiplier=0.015625,
                                          residual_multiplier=0.22))
