"""Qwen2 / Qwen2.5 (HF `qwen2`): Llama with q/k/v biases."""

from __future__ import annotations

from jaxlora.models.families import base


def from_hf(hf: dict) -> dict:
    fields = base.llama_fields(hf, "qwen2", eps_default=1e-6)
    return dict(fields, attn_bias=True,
                **base.qwen_attention_layout(hf, fields["n_layer"], fields["block_size"], "qwen2"))


def to_hf(c) -> dict:
    return dict(base.llama_hf(c), **base.qwen_attention_hf(c))


_rows = [dict(name=n, n_layer=l, n_embd=e, n_head=h, n_query_groups=g, intermediate_size=i, block_size=ctx,
              tie_embeddings=tie)
         for n, l, e, h, g, i, ctx, tie in (
             ("Qwen2.5-0.5B", 24, 896, 14, 2, 4864, 32768, True),
             ("Qwen2.5-1.5B", 28, 1536, 12, 2, 8960, 131072, True),
             ("Qwen2.5-3B", 36, 2048, 16, 2, 11008, 32768, True),
             ("Qwen2.5-7B", 28, 3584, 28, 4, 18944, 131072, False),
             ("Qwen2.5-14B", 48, 5120, 40, 8, 13824, 131072, False),
             ("Qwen2.5-32B", 64, 5120, 40, 8, 27648, 131072, False),
             ("Qwen2.5-72B", 80, 8192, 64, 8, 29568, 131072, False))]

FAMILY = base.Family(model_types=("qwen2",), architecture="Qwen2ForCausalLM", from_hf=from_hf, to_hf=to_hf,
                     key_map=base.llama_keys,
                     presets=base.presets("qwen2", _rows, vocab_size=151643, padded_vocab_size=151936,
                                          rope_base=1000000.0, norm_eps=1e-6, attn_bias=True))
