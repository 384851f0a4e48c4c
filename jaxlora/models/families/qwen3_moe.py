"""Qwen3-MoE (HF `qwen3_moe`): Qwen3 attention, top-k of many SiLU-gated experts, no shared expert."""

from __future__ import annotations

from jaxlora.models.families import base
from jaxlora.models.families.qwen3 import qwen3_fields


def from_hf(hf: dict) -> dict:
    # its window, when on, is on every layer; intermediate_size (of dense layers) is unused when all are sparse
    fields = qwen3_fields(dict(hf, max_window_layers=0, intermediate_size=hf["moe_intermediate_size"]), "qwen3_moe")
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise base.CheckpointError("unsupported qwen3_moe config.json: dense MLP layers between the expert layers "
                                   f"(mlp_only_layers={hf.get('mlp_only_layers')}, decoder_sparse_step="
                                   f"{hf.get('decoder_sparse_step')}); jaxlora implements every layer sparse")
    n_expert = hf.get("num_experts") or hf["num_local_experts"]
    return dict(fields, mlp_class="LLaMAMoE", intermediate_size=hf["moe_intermediate_size"], n_expert=n_expert,
                n_expert_per_token=hf["num_experts_per_tok"], moe_norm_topk=bool(hf.get("norm_topk_prob", False)))


def to_hf(c) -> dict:
    hf = base.llama_hf(c)
    del hf["intermediate_size"]
    return dict(hf, attention_bias=c.attn_bias, use_sliding_window=c.sliding_window_size is not None,
                sliding_window=c.sliding_window_size, moe_intermediate_size=c.intermediate_size, num_experts=c.n_expert,
                num_experts_per_tok=c.n_expert_per_token, norm_topk_prob=c.moe_norm_topk, decoder_sparse_step=1,
                mlp_only_layers=[])


def key_map(c) -> base.KeyMap:
    p = "model.layers.{i}."
    top, block = base.llama_keys(c, mlp=base.expert_mlp(c, "mlp", gate="gate_proj", up="up_proj", down="down_proj"))
    block["attn"].update(q_norm=base.norm(p + "self_attn.q_norm"), k_norm=base.norm(p + "self_attn.k_norm"))
    return top, block


_rows = [dict(name="Qwen3-30B-A3B", n_layer=48, n_embd=2048, n_head=32, n_query_groups=4, intermediate_size=768,
              n_expert=128, n_expert_per_token=8)]

FAMILY = base.Family(model_types=("qwen3_moe",), architecture="Qwen3MoeForCausalLM", from_hf=from_hf, to_hf=to_hf,
                     key_map=key_map,
                     presets=base.presets("qwen3_moe", _rows, vocab_size=151643, padded_vocab_size=151936,
                                          head_size=128, block_size=40960, rope_base=1000000.0, norm_eps=1e-6,
                                          qk_norm="head", mlp_class="LLaMAMoE", moe_norm_topk=True))
