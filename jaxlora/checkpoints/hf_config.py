"""ModelConfig -> an HF `config.json` dict (the inverse of `ModelConfig.from_hf_config`).

Written in the long-standing ("legacy") key format of Hub checkpoints (`rope_theta`, `rope_scaling`,
`torch_dtype`, GPT-NeoX's `rotary_pct`), which both transformers 4 and 5 read.
`ModelConfig.from_hf_config(hf_config_dict(c))` gives back `c` (its `name` aside).
"""

from __future__ import annotations

import dataclasses

from jaxlora.errors import CheckpointError
from jaxlora.models.config import ModelConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "phi": "PhiForCausalLM", "phi3": "Phi3ForCausalLM", "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "falcon": "FalconForCausalLM", "gpt_neox": "GPTNeoXForCausalLM",
}


def hf_config_dict(config: ModelConfig, dtype: str = "float32") -> dict:
    """The `config.json` of `config` for transformers; dtype: the stored weights' dtype name."""
    c = config
    t = c.model_type
    if t not in ARCHITECTURES:
        raise CheckpointError(f"cannot write an HF config.json for model_type {t!r}")
    hf = dict(architectures=[ARCHITECTURES[t]], model_type=t, vocab_size=c.padded_vocab_size, hidden_size=c.n_embd,
              num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, max_position_embeddings=c.block_size,
              tie_word_embeddings=c.tie_embeddings, rope_theta=c.rope_base, torch_dtype=dtype,
              # unknown to a ModelConfig: null, not the config class defaults (which may lie outside the vocab)
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if t in ("llama", "mistral", "mixtral", "qwen2", "phi3"):
        hf.update(num_key_value_heads=c.n_query_groups, head_dim=c.head_size, intermediate_size=c.intermediate_size,
                  hidden_act="silu", rms_norm_eps=c.norm_eps)
        if t == "llama":
            hf.update(attention_bias=c.attn_bias, mlp_bias=c.bias)
            if c.rope_scaling:
                scaling = c.rope_scaling_dict
                scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
                hf["rope_scaling"] = {"rope_type": "llama3", **scaling}
        if t in ("mistral", "mixtral", "phi3"):
            hf["sliding_window"] = c.sliding_window_size
        if t == "qwen2":  # max_window_layers=0: every layer slides, as jaxlora applies the window
            hf.update(use_sliding_window=c.sliding_window_size is not None, sliding_window=c.sliding_window_size,
                      max_window_layers=0)
        if t == "phi3":
            hf["partial_rotary_factor"] = c.rotary_percentage
        if t == "mixtral":
            hf.update(num_local_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_token)
    elif t in ("gemma", "gemma2"):
        act = "gelu_pytorch_tanh" if c.gelu_approximate else "gelu"
        hf.update(num_key_value_heads=c.n_query_groups, head_dim=c.head_size, intermediate_size=c.intermediate_size,
                  hidden_act=act, hidden_activation=act, rms_norm_eps=c.norm_eps, attention_bias=c.attn_bias)
        if t == "gemma2":
            hf.update(query_pre_attn_scalar=c.attention_scores_scalar,
                      attn_logit_softcapping=c.attention_logit_softcapping,
                      final_logit_softcapping=c.final_logit_softcapping, sliding_window=c.sliding_window_size,
                      layer_types=["sliding_attention" if c.sliding_window_for_layer(i) else "full_attention"
                                   for i in range(c.n_layer)])
    elif t == "phi":
        hf.update(num_key_value_heads=c.n_query_groups, intermediate_size=c.intermediate_size,
                  hidden_act="gelu_new" if c.gelu_approximate else "gelu", layer_norm_eps=c.norm_eps,
                  partial_rotary_factor=c.rotary_percentage, qk_layernorm=False)
    elif t == "falcon":
        hf.update(_falcon_layout(c), ffn_hidden_size=c.intermediate_size, layer_norm_epsilon=c.norm_eps, bias=c.bias,
                  alibi=False, activation="gelu")
    else:  # gpt_neox
        hf.update(intermediate_size=c.intermediate_size, rotary_pct=c.rotary_percentage, rotary_emb_base=c.rope_base,
                  use_parallel_residual=c.parallel_residual, attention_bias=c.bias, layer_norm_eps=c.norm_eps,
                  hidden_act="gelu_new" if c.gelu_approximate else "gelu")
    check_hf_config(c, hf, f"the {t} config.json that jaxlora can write")
    return hf


def _falcon_layout(c: ModelConfig) -> dict:
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


def check_hf_config(c: ModelConfig, hf: dict, what: str = "the given config.json") -> None:
    """CheckpointError unless `hf` describes `c` (its name, and vocab_size below the padded size, aside)."""
    back = ModelConfig.from_hf_config(hf)
    diff = [f.name for f in dataclasses.fields(c)
            if f.name not in ("name", "vocab_size") and getattr(back, f.name) != getattr(c, f.name)]
    if diff:
        raise CheckpointError(f"{what} does not describe this model: it differs in {', '.join(diff)}")
