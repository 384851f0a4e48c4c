"""Qwen3 dense (HF `qwen3`): Llama with QK-norm over each head, head_dim independent of the width."""

from __future__ import annotations

from jaxlora.models.families import base


def qwen3_fields(hf: dict, family: str) -> dict:
    """The fields Qwen3 and Qwen3-MoE share: attention (QK-norm, biases, sliding layers)."""
    fields = base.llama_fields(hf, family, eps_default=1e-6)
    bias = bool(hf.get("attention_bias", False))
    return dict(fields, qk_norm="head", attn_bias=bias, attn_out_bias=bias,
                **base.qwen_attention_layout(hf, fields["n_layer"], fields["block_size"], family))


def qwen3_hf(c) -> dict:
    return dict(base.llama_hf(c), attention_bias=c.attn_bias, **base.qwen_attention_hf(c))


def from_hf(hf: dict) -> dict:
    return qwen3_fields(hf, "qwen3")


def key_map(c) -> base.KeyMap:
    top, block = base.llama_keys(c)
    p = "model.layers.{i}.self_attn."
    block["attn"].update(q_norm=base.norm(p + "q_norm"), k_norm=base.norm(p + "k_norm"))
    return top, block


_rows = [dict(name=n, n_layer=l, n_embd=e, n_head=h, n_query_groups=8, intermediate_size=i, block_size=40960,
              tie_embeddings=tie)
         for n, l, e, h, i, tie in (("Qwen3-0.6B", 28, 1024, 16, 3072, True), ("Qwen3-1.7B", 28, 2048, 16, 6144, True),
                                    ("Qwen3-4B", 36, 2560, 32, 9728, True), ("Qwen3-8B", 36, 4096, 32, 12288, False))]

FAMILY = base.Family(model_types=("qwen3",), architecture="Qwen3ForCausalLM", from_hf=from_hf, to_hf=qwen3_hf,
                     key_map=key_map,
                     presets=base.presets("qwen3", _rows, vocab_size=151643, padded_vocab_size=151936, head_size=128,
                                          rope_base=1000000.0, norm_eps=1e-6, qk_norm="head"))
