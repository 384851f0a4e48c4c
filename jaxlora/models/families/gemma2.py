"""Gemma 2 (HF `gemma2`): Gemma 1 plus pre and post norms, alternating sliding / global layers, soft-capping."""

from __future__ import annotations

from jaxlora.models.families import base
from jaxlora.models.families.gemma import gemma_fields, gemma_hf


def from_hf(hf: dict) -> dict:
    fields = gemma_fields(hf, "gemma2", hf.get("hidden_activation") or "gelu_pytorch_tanh")
    fields.update(post_attention_norm=True, post_mlp_norm=True, rope_scaling=base.rope_scaling(hf, "gemma2"),
                  attention_scores_scalar=hf.get("query_pre_attn_scalar", fields["head_size"]),
                  attention_logit_softcapping=hf.get("attn_logit_softcapping"),
                  final_logit_softcapping=hf.get("final_logit_softcapping"))
    if hf.get("sliding_window"):
        layer_types = hf.get("layer_types")
        expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(fields["n_layer"])]
        if layer_types is not None and list(layer_types) != expected:
            raise base.CheckpointError("unsupported Gemma-2 layer_types: only alternating sliding/full "
                                       "attention starting with a sliding layer is supported")
        fields.update(sliding_window_size=int(hf["sliding_window"]), attention_types=_alternating(fields["n_layer"]))
    return fields


def _alternating(n_layer: int) -> tuple[str, ...]:
    return tuple("sliding" if i % 2 == 0 else "global" for i in range(n_layer))


def to_hf(c) -> dict:
    return dict(gemma_hf(c), query_pre_attn_scalar=c.attention_scores_scalar,
                attn_logit_softcapping=c.attention_logit_softcapping,
                final_logit_softcapping=c.final_logit_softcapping, sliding_window=c.sliding_window_size,
                layer_types=["sliding_attention" if c.sliding_window_for_layer(i) else "full_attention"
                             for i in range(c.n_layer)], **base.rope_scaling_hf(c))


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
               final_logit_softcapping=30.0, sliding_window_size=4096)
_rows = [dict(name="gemma-2-2b", n_layer=26, n_embd=2304, n_head=8, n_query_groups=4, intermediate_size=9216,
              attention_scores_scalar=256),
         dict(name="gemma-2-9b", n_layer=42, n_embd=3584, n_head=16, n_query_groups=8, intermediate_size=14336,
              attention_scores_scalar=256),
         dict(name="gemma-2-27b", n_layer=46, n_embd=4608, n_head=32, n_query_groups=16, head_size=128,
              intermediate_size=36864, attention_scores_scalar=144)]

_rows = [dict(row, attention_types=_alternating(row["n_layer"])) for row in _rows]

FAMILY = base.Family(model_types=("gemma2",), architecture="Gemma2ForCausalLM", from_hf=from_hf, to_hf=to_hf,
                     key_map=key_map, tie_default=True, presets=base.presets("gemma2", _rows, **_shared))
