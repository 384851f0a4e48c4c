"""Gemma 3 text (HF `gemma3_text`): Gemma 2's pre+post norms with QK-norm, sliding layers (5 of every 6)
with their own unscaled RoPE base, global layers with the model's (optionally scaled) RoPE, no soft-capping
of the scores (transformers ignores attn_logit_softcapping)."""

from __future__ import annotations

from jaxlora.models import rope
from jaxlora.models.families import base
from jaxlora.models.families.gemma import gemma_fields, gemma_hf
from jaxlora.models.families.gemma2 import key_map as gemma2_key_map


def _rope(hf: dict) -> tuple[dict, dict]:
    """(global, sliding) RoPE parameters, standardised as transformers' Gemma3TextConfig does: a legacy
    rope_scaling applies to the global layers only; rope_theta / rope_local_base_freq are the bases."""
    nested = hf.get("rope_parameters") or {}
    if nested and not {"full_attention", "sliding_attention"} >= set(nested):
        nested = {"full_attention": nested}
    full = {**(hf.get("rope_scaling") or {}), **nested.get("full_attention", {})}
    full.setdefault("rope_theta", hf.get("rope_theta") or 1000000.0)
    local = dict(nested.get("sliding_attention", {}))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq") or 10000.0)
    return full, local


def from_hf(hf: dict) -> dict:
    fields = gemma_fields(hf, "gemma3_text", hf.get("hidden_activation") or "gelu_pytorch_tanh")
    n = fields["n_layer"]
    full, local = _rope(hf)
    if local.get("rope_type", "default") != "default":
        raise base.CheckpointError(f"unsupported gemma3_text config.json: RoPE scaling {local['rope_type']!r} on the "
                                   "sliding layers (jaxlora scales the global layers' RoPE only)")
    pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
    fields.update(
        qk_norm="head", post_attention_norm=True, post_mlp_norm=True,
        rope_base=float(full["rope_theta"]), rope_scaling=base.rope_scaling({"rope_parameters": full}, "gemma3_text"),
        rope_local_base=float(local["rope_theta"]),
        attention_scores_scalar=hf.get("query_pre_attn_scalar", 256),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        **base.attention_layout(hf, n, fields["block_size"], "gemma3_text", window=hf.get("sliding_window", 4096),
                                sliding=[(i + 1) % pattern != 0 for i in range(n)]))
    return fields


def to_hf(c) -> dict:
    full = {"rope_type": "default", "rope_theta": c.rope_base, **(base.rope_scaling_hf(c).get("rope_scaling") or {})}
    return dict(gemma_hf(c), query_pre_attn_scalar=c.attention_scores_scalar,
                final_logit_softcapping=c.final_logit_softcapping, sliding_window=c.sliding_window_size,
                layer_types=base.layer_types_hf(c), rope_theta=c.rope_base, rope_local_base_freq=c.rope_local_base,
                rope_parameters={"full_attention": full,
                                 "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_base}})


def key_map(c) -> base.KeyMap:
    top, block = gemma2_key_map(c)
    p = "model.layers.{i}.self_attn."
    block["attn"].update(q_norm=base.norm(p + "q_norm"), k_norm=base.norm(p + "k_norm"))
    return top, block


_FIVE_TO_ONE = ("sliding",) * 5 + ("global",)
_shared = dict(head_size=256, norm_eps=1e-6, norm_unit_offset=True, mlp_class="GemmaMLP", gelu_approximate=True,
               scale_embeddings=True, tie_embeddings=True, qk_norm="head", post_attention_norm=True, post_mlp_norm=True,
               rope_base=1000000.0, rope_local_base=10000.0, attention_scores_scalar=256, vocab_size=262144,
               padded_vocab_size=262144)
_rows = [dict(name="gemma-3-1b-pt", n_layer=26, n_embd=1152, n_head=4, n_query_groups=1, intermediate_size=6912,
              block_size=32768, sliding_window_size=512, attention_types=_FIVE_TO_ONE),
         dict(name="gemma-3-4b-pt", n_layer=34, n_embd=2560, n_head=8, n_query_groups=4, intermediate_size=10240,
              block_size=131072, sliding_window_size=1024, attention_types=_FIVE_TO_ONE, padded_vocab_size=262208,
              rope_scaling=rope.parse_rope_scaling(dict(rope_type="linear", factor=8.0), max_position_embeddings=131072))]

FAMILY = base.Family(model_types=("gemma3_text",), architecture="Gemma3ForCausalLM", from_hf=from_hf, to_hf=to_hf,
                     key_map=key_map, tie_default=True, presets=base.presets("gemma3_text", _rows, **_shared))


# Gemma 3 4B and larger ship as a vision-language model (`gemma3`, Gemma3ForConditionalGeneration) around this
# text model: jaxlora reads its text_config and the text model's tensors (checkpoint names "language_model.model.*",
# module names "model.language_model.*" for PEFT), leaves out the vision tower and projector, and exports the
# text model alone (a gemma3_text checkpoint that Gemma3ForCausalLM loads).


def _text_config(hf: dict) -> dict:
    text = dict(hf.get("text_config") or {})
    return dict(text, model_type="gemma3", _name_or_path=hf.get("_name_or_path") or "gemma3",
                tie_word_embeddings=hf.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))


def _wrapped(src: base.Source) -> base.Source:
    def names(name: str) -> tuple[str, ...]:
        inner = name.removeprefix("model.")
        return (f"model.language_model.{inner}", f"language_model.model.{inner}") if inner != name else (
            name, f"language_model.{name}")
    return base.Source(names(src.names[0]), src.transpose, src.part, src.experts)


def _multimodal_key_map(c) -> base.KeyMap:
    def wrap(node):
        return _wrapped(node) if isinstance(node, base.Source) else {k: wrap(v) for k, v in node.items()}
    top, block = key_map(c)
    return wrap(top), wrap(block)


MULTIMODAL = base.Family(model_types=("gemma3",), architecture="Gemma3ForConditionalGeneration", from_hf=from_hf,
                         to_hf=to_hf, key_map=_multimodal_key_map, tie_default=True, unwrap=_text_config,
                         ignored=r"^(vision_tower|multi_modal_projector)\.", export_as="gemma3_text")
FAMILIES = (FAMILY, MULTIMODAL)
