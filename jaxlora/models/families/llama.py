"""Llama 2 / 3 / 3.1 / 3.2 and TinyLlama (HF `llama`)."""

from __future__ import annotations

from jaxlora.models import rope
from jaxlora.models.families import base

_LLAMA3_ROPE = lambda factor: rope.parse_rope_scaling(
    dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192), max_position_embeddings=131072)


def from_hf(hf: dict) -> dict:
    fields = base.llama_fields(hf, "llama")
    # attention_bias: q, k, v and o projections; mlp_bias: the three MLP projections
    return dict(fields, attn_bias=bool(hf.get("attention_bias", False)), attn_out_bias=bool(hf.get("attention_bias", False)),
                bias=bool(hf.get("mlp_bias", False)))


def to_hf(c) -> dict:
    return dict(base.llama_hf(c), attention_bias=c.attn_bias, mlp_bias=c.bias)


_rows = [dict(name=n, vocab_size=32000, padded_vocab_size=32000, n_layer=l, n_embd=e, n_head=h, n_query_groups=g,
              intermediate_size=i, block_size=4096)
         for n, l, e, h, g, i in (("Llama-2-7b-hf", 32, 4096, 32, 32, 11008),
                                  ("Llama-2-13b-hf", 40, 5120, 40, 40, 13824),
                                  ("Llama-2-70b-hf", 80, 8192, 64, 8, 28672))]
_rows += [dict(name=n, vocab_size=128000, padded_vocab_size=128256, n_layer=l, n_embd=e, n_head=h, n_query_groups=g,
               intermediate_size=i, block_size=ctx, rope_base=500000.0, tie_embeddings=tie, rope_scaling=rope)
          for n, l, e, h, g, i, ctx, tie, rope in (
              ("Meta-Llama-3-8B", 32, 4096, 32, 8, 14336, 8192, False, None),
              ("Meta-Llama-3-70B", 80, 8192, 64, 8, 28672, 8192, False, None),
              ("Llama-3.1-8B", 32, 4096, 32, 8, 14336, 131072, False, _LLAMA3_ROPE(8.0)),
              ("Llama-3.1-70B", 80, 8192, 64, 8, 28672, 131072, False, _LLAMA3_ROPE(8.0)),
              ("Llama-3.1-405B", 126, 16384, 128, 8, 53248, 131072, False, _LLAMA3_ROPE(8.0)),
              ("Llama-3.2-1B", 16, 2048, 32, 8, 8192, 131072, True, _LLAMA3_ROPE(32.0)),
              ("Llama-3.2-3B", 28, 3072, 24, 8, 8192, 131072, True, _LLAMA3_ROPE(32.0)))]
_rows += [dict(name=n, vocab_size=32000, padded_vocab_size=32000, n_layer=22, n_embd=2048, n_head=32, n_query_groups=4,
               intermediate_size=5632, block_size=2048)
          for n in ("TinyLlama-1.1B-intermediate-step-1431k-3T", "TinyLlama-1.1B-Chat-v1.0")]

FAMILY = base.Family(model_types=("llama",), architecture="LlamaForCausalLM", from_hf=from_hf, to_hf=to_hf,
                     key_map=base.llama_keys, presets=base.presets("llama", _rows))
