"""Mixtral 8x7B / 8x22B (HF `mixtral`): Llama attention, top-2 of 8 SiLU-gated experts."""

from __future__ import annotations

from jaxlora.models.families import base


def from_hf(hf: dict) -> dict:
    fields = base.llama_fields(hf, "mixtral")
    return dict(fields, **base.every_layer_window(hf, fields, "mixtral"), mlp_class="LLaMAMoE",
                n_expert=hf["num_local_experts"], n_expert_per_token=hf["num_experts_per_tok"])


def to_hf(c) -> dict:
    return dict(base.llama_hf(c), sliding_window=c.sliding_window_size, num_local_experts=c.n_expert,
                num_experts_per_tok=c.n_expert_per_token)


def key_map(c) -> base.KeyMap:
    return base.llama_keys(c, mlp=base.expert_mlp(c, "block_sparse_moe", gate="w1", up="w3", down="w2"))


_shared = dict(n_head=32, n_query_groups=8, rope_base=1000000.0, mlp_class="LLaMAMoE", n_expert=8, n_expert_per_token=2)
_rows = [dict(name="Mixtral-8x7B-v0.1", vocab_size=32000, padded_vocab_size=32000, n_layer=32, n_embd=4096,
              intermediate_size=14336, block_size=32768),
         dict(name="Mixtral-8x22B-v0.1", vocab_size=32768, padded_vocab_size=32768, n_layer=56, n_embd=6144, n_head=48,
              intermediate_size=16384, block_size=65536)]

FAMILY = base.Family(model_types=("mixtral",), architecture="MixtralForCausalLM", from_hf=from_hf, to_hf=to_hf,
                     key_map=key_map, presets=base.presets("mixtral", _rows, **_shared))
