"""Gemma 2 (HF `gemma2`): Gemma 1 plus pre and post norms, alternating sliding / global layers, soft-capping."""

from __future__ import annotations

from jaxlora.models.families import base
from jaxlora.models.families.gemma import gemma_fields, gemma_hf


def from_hf(hf: dict) -> dict:
    fields = gemma_fields(hf, "gemma2", hf.get("hidden_activation") or "gelu_pytorch_tanh")
    fields.update(post_attention_norm=True, post_mlp_norm=True, rope_scaling=base.rope_scaling(hf, "gemma2"),
                  # transformers' Gemma2Config defaults where config.json does not say (null stays null)
                  attention_scores_scalar=hf.get("query_pre_attn_scalar", 256),
                  attention_logit_softcapping=hf.get("attn_logit_softcapping", 50.0),
                  final_logit_softcapping=hf.get("final_logit_softcapping", 30.0))
    n = fields["n_layer"]
    fields.update(base.attention_layout(hf, n, fields["block_size"], "gemma2", window=hf.get("sliding_window", 4096),
                                        sliding=[i % 2 == 0 for i in range(n)]))  # transformers: even layers slide
    return fields


def to_hf(c) -> dict:
    return dict(gemma_hf(c), query_pre_attn_scalar=c.attention_scores_scalar,
                attn_logit_softcapping=c.attention_logit_softcapping,
                final_logit_softcapping=c.final_logit_softcapping, sliding_window=c.sliding_window_size,
                layer_types=base.layer_types_hf(c), **base.rope_scaling_hf(c))


def key_map(c) -> base.KeyMap:
    top, block = base.llama_keys(c)
    p = "model.layers.{i}."
    block.update(post_attention_norm=base.norm(p + "post_attention_layernorm"),
                 norm_2=base.norm(p + "pre_feedforward_layernorm"),
                 post_mlp_norm=base.norm(p + "post_feedforward_layernorm"))
    return top, block


_shared = dict(vocab_size=256000, padded_vocab_size=256000, head_size=256, norm_eps=1e-6, norm_unit_offset=True,
               mlp_class="GemmaMLP", gelu_approximate=True, scale_embeddings=True, tie_embeddings=True, block_size=8192,
               post_attention_norm=True, post_mlp_norm=True, attention_logit_softcapping=50.0,
               final_logit_softcapping=30.0, sliding_window_size=4096, attention_types=("sliding", "global"))
_rows = [dict(name="gemma-2-2b", n_layer=26, n_embd=2304, n_head=8, n_query_groups=4, intermediate_size=9216,
              attention_scores_scalar=256),
         dict(name="gemma-2-9b", n_layer=42, n_embd=3584, n_head=16, n_query_groups=8, intermediate_size=14336,
              attention_scores_scalar=256),
         dict(name="gemma-2-27b", n_layer=46, n_embd=4608, n_head=32, n_query_groups=16, head_size=128,
              intermediate_size=36864, attention_scores_scalar=144)]

FAMILY = base.Family(model_types=("gemma2",), architecture="Gemma2ForCausalLM", from_hf=from_hf, to_hf=to_hf,
                     key_map=key_map, tie_default=True, presets=base.presets("gemma2", _rows, **_shared))
