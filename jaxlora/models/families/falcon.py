"""Falcon 7B / 40B and the new decoder architecture (HF `falcon`): fused grouped qkv, parallel residual."""

from __future__ import annotations

from jaxlora.errors import CheckpointError
from jaxlora.models.families import base
from jaxlora.models.families.base import Source, linear, norm


def from_hf(hf: dict) -> dict:
    base.refuse_true(hf, "falcon", "alibi")
    n_head = hf.get("num_attention_heads") or hf["n_head"]
    new_arch = bool(hf.get("new_decoder_architecture", False))
    kv = (hf.get("num_kv_heads") or n_head) if new_arch else (1 if hf.get("multi_query", True) else n_head)
    hidden = hf["hidden_size"]
    parallel = bool(hf.get("parallel_attn", True))
    n_norms = hf.get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
    base.require(hf, "activation", ("gelu",), "gelu", "falcon")
    return dict(
        n_layer=hf.get("num_hidden_layers") or hf["n_layer"], n_embd=hidden, n_head=n_head,
        n_query_groups=kv, intermediate_size=hf.get("ffn_hidden_size") or 4 * hidden,
        block_size=hf.get("max_position_embeddings", 2048), norm_class="LayerNorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), parallel_residual=parallel,
        shared_attention_norm=parallel and n_norms == 1, rope_base=base.rope_base(hf),
        rope_scaling=base.rope_scaling(hf, "falcon"), bias=bool(hf.get("bias", False)), mlp_class="GptNeoxMLP",
    )


def to_hf(c) -> dict:
    return dict(_layout(c), ffn_hidden_size=c.intermediate_size, layer_norm_epsilon=c.norm_eps, bias=c.bias,
                alibi=False, activation="gelu", **base.rope_scaling_hf(c))


def _layout(c) -> dict:
    """Falcon's attention/residual switches. The new decoder architecture is needed for grouped-query
    attention and for two parallel norms; it is always parallel."""
    new_arch = c.n_query_groups not in (1, c.n_head) or (c.parallel_residual and not c.shared_attention_norm)
    if new_arch and not c.parallel_residual:
        raise CheckpointError("HF Falcon cannot express a sequential (non-parallel) block with grouped-query attention")
    if new_arch:
        return dict(new_decoder_architecture=True, num_kv_heads=c.n_query_groups, parallel_attn=True,
                    num_ln_in_parallel_attn=1 if c.shared_attention_norm else 2, multi_query=c.n_query_groups == 1)
    return dict(new_decoder_architecture=False, multi_query=c.n_query_groups == 1, parallel_attn=c.parallel_residual,
                num_kv_heads=c.n_query_groups)


def key_map(c) -> base.KeyMap:
    p = "transformer.h.{i}."
    # Falcon's fused q/k/v holds, per kv head, its query heads then k then v (multi-query's
    # q | k | v is the one-kv-head case of that layout).
    qkv = lambda part: linear(p + "self_attention.query_key_value", part=("qkv", part, "grouped"))
    block = {"attn": {"q": qkv("q"), "k": qkv("k"), "v": qkv("v"), "proj": linear(p + "self_attention.dense")},
             "mlp": {"fc": linear(p + "mlp.dense_h_to_4h"), "proj": linear(p + "mlp.dense_4h_to_h")}}
    if c.shared_attention_norm:
        block["norm_1"] = norm(p + "input_layernorm")
    elif c.parallel_residual:
        block.update(norm_1=norm(p + "ln_attn"), norm_2=norm(p + "ln_mlp"))
    else:
        block.update(norm_1=norm(p + "input_layernorm"), norm_2=norm(p + "post_attention_layernorm"))
    return {"wte": Source(("transformer.word_embeddings.weight",)), "ln_f": norm("transformer.ln_f"),
            "lm_head": linear("lm_head")}, block


_shared = dict(vocab_size=65024, padded_vocab_size=65024, block_size=2048, norm_class="LayerNorm",
               parallel_residual=True, mlp_class="GptNeoxMLP")
_rows = [dict(name="falcon-7b", n_layer=32, n_embd=4544, n_head=71, n_query_groups=1, intermediate_size=18176,
              shared_attention_norm=True),
         dict(name="falcon-40b", n_layer=60, n_embd=8192, n_head=128, n_query_groups=8, intermediate_size=32768)]

FAMILY = base.Family(model_types=("falcon",), architecture="FalconForCausalLM", from_hf=from_hf, to_hf=to_hf,
                     key_map=key_map, tie_default=True, presets=base.presets("falcon", _rows, **_shared))
