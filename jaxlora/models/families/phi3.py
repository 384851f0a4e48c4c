"""Phi-3 / Phi-3.5 (HF `phi3`): Llama with fused qkv_proj and gate_up_proj tensors."""

from __future__ import annotations

from jaxlora.models.families import base
from jaxlora.models.families.base import linear


def from_hf(hf: dict) -> dict:
    # transformers' Phi3Config has original_max_position_embeddings=4096 when config.json does not say,
    # and it takes precedence over the rope_scaling dict's
    hf = dict(hf, original_max_position_embeddings=hf.get("original_max_position_embeddings") or 4096)
    fields = base.llama_fields(hf, "phi3")
    return dict(fields, **base.every_layer_window(hf, fields, "phi3"))


def to_hf(c) -> dict:
    return dict(base.llama_hf(c), sliding_window=c.sliding_window_size, partial_rotary_factor=c.rotary_percentage)


def key_map(c) -> base.KeyMap:
    p = "model.layers.{i}."
    qkv = lambda part: linear(p + "self_attn.qkv_proj", part=("qkv", part, "contiguous"))
    attn = {"q": qkv("q"), "k": qkv("k"), "v": qkv("v"), "proj": linear(p + "self_attn.o_proj")}
    mlp = {"fc_1": linear(p + "mlp.gate_up_proj", part=("halves", 0)),
           "fc_2": linear(p + "mlp.gate_up_proj", part=("halves", 1)), "proj": linear(p + "mlp.down_proj")}
    return base.llama_keys(c, attn=attn, mlp=mlp)


FAMILY = base.Family(model_types=("phi3",), architecture="Phi3ForCausalLM", from_hf=from_hf, to_hf=to_hf,
                     key_map=key_map,
                     presets=base.presets("phi3", [dict(name="Phi-3-mini-4k-instruct", vocab_size=32000,
                                                        padded_vocab_size=32064, n_layer=32, n_embd=3072, n_head=32,
                                                        n_query_groups=32, intermediate_size=8192, block_size=4096)]))
