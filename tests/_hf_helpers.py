"""Tiny random HF checkpoints of every supported family, for the export / PEFT interop tests (fp32, CPU)."""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 64
SEQ = 10

_common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
               attn_implementation="eager")

# name -> (HF config class, kwargs): GQA wherever the family has it, windows shorter than SEQ.
FAMILIES = {
    "llama": ("LlamaConfig", dict(intermediate_size=48, num_key_value_heads=2)),
    "llama3.1-rope": ("LlamaConfig", dict(intermediate_size=48, num_key_value_heads=2, rope_theta=500000.0,
                                          rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                            high_freq_factor=4.0,
                                                            original_max_position_embeddings=16))),
    "mistral": ("MistralConfig", dict(intermediate_size=48, num_key_value_heads=2, sliding_window=4)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=24, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", dict(intermediate_size=48, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-window-layers": ("Qwen2Config", dict(intermediate_size=48, num_key_value_heads=2, use_sliding_window=True,
                                                sliding_window=4, max_window_layers=1)),  # layer 1 slides, 0 not
    "phi": ("PhiConfig", dict(intermediate_size=48, partial_rotary_factor=0.5)),
    "phi3": ("Phi3Config", dict(intermediate_size=48, num_key_value_heads=2, pad_token_id=0)),
    "gemma": ("GemmaConfig", dict(intermediate_size=48, num_key_value_heads=1, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(intermediate_size=48, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                    query_pre_attn_scalar=12, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=3.0)),
    "falcon": ("FalconConfig", dict(multi_query=True, bias=True)),
    "falcon-new-arch": ("FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2)),
    "gpt_neox": ("GPTNeoXConfig", dict(intermediate_size=48, rotary_pct=0.25)),
    "gpt_neox-sequential": ("GPTNeoXConfig", dict(intermediate_size=48, rotary_pct=0.5, use_parallel_residual=False)),
    # RoPE scaling past the original context (SEQ > original_max_position_embeddings / max_position_embeddings)
    "llama-linear-rope": ("LlamaConfig", dict(intermediate_size=48, num_key_value_heads=2,
                                              rope_scaling=dict(rope_type="linear", factor=4.0))),
    "llama-dynamic-rope": ("LlamaConfig", dict(intermediate_size=48, num_key_value_heads=2, max_position_embeddings=6,
                                               rope_scaling=dict(rope_type="dynamic", factor=2.0))),
    "qwen2-yarn-rope": ("Qwen2Config", dict(intermediate_size=48, num_key_value_heads=2, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=6, beta_fast=16.0, beta_slow=2.0))),
    "phi3-longrope": ("Phi3Config", dict(intermediate_size=48, num_key_value_heads=2, pad_token_id=0,
                                         original_max_position_embeddings=6, rope_scaling=dict(
                                             type="longrope", short_factor=[1.0, 1.1, 1.3, 1.6],
                                             long_factor=[1.0, 2.0, 3.5, 6.0]))),
    # the families of the registry's second wave
    "qwen3": ("Qwen3Config", dict(intermediate_size=48, num_key_value_heads=2, head_dim=12, tie_word_embeddings=True)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=4,
                                         num_experts_per_tok=2)),
    "qwen3_moe-norm-topk": ("Qwen3MoeConfig", dict(num_key_value_heads=2, head_dim=8, moe_intermediate_size=16,
                                                   num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                                   use_sliding_window=True, sliding_window=4)),
    "gemma3": ("Gemma3TextConfig", dict(intermediate_size=48, num_key_value_heads=2, head_dim=8, num_hidden_layers=3,
                                        sliding_window=4, layer_types=["sliding_attention", "full_attention",
                                                                       "sliding_attention"],
                                        query_pre_attn_scalar=12, final_logit_softcapping=3.0,
                                        rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0,
                                                                                rope_theta=100000.0),
                                                         "sliding_attention": dict(rope_type="default",
                                                                                   rope_theta=1000.0)})),
    # a window as long as the context: no window, but the sliding layer keeps its own RoPE base
    "gemma3-window-is-context": ("Gemma3TextConfig", dict(intermediate_size=48, num_key_value_heads=2, head_dim=8,
                                                          sliding_window=64, query_pre_attn_scalar=8,
                                                          layer_types=["sliding_attention", "full_attention"])),
    # Gemma 3 4B+ ship as a vision-language model around the text model: jaxlora loads the text model
    "gemma3-multimodal": ("Gemma3Config", dict(
        text_config=dict(intermediate_size=48, num_key_value_heads=2, head_dim=8, sliding_window=4,
                         layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=12),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4)),
    "olmo2": ("Olmo2Config", dict(intermediate_size=48, num_key_value_heads=2)),
    "smollm3": ("SmolLM3Config", dict(intermediate_size=48, num_key_value_heads=2, num_hidden_layers=4, pad_token_id=0,
                                      no_rope_layer_interval=2, use_sliding_window=True, sliding_window=4)),
    "granite": ("GraniteConfig", dict(intermediate_size=48, num_key_value_heads=2, embedding_multiplier=3.0,
                                      attention_multiplier=0.3, residual_multiplier=0.5, logits_scaling=2.5)),
    "stablelm": ("StableLmConfig", dict(intermediate_size=48, num_key_value_heads=2, use_qkv_bias=True,
                                        qk_layernorm=True, partial_rotary_factor=0.5)),
    "stablelm-parallel": ("StableLmConfig", dict(intermediate_size=48, num_key_value_heads=4, use_parallel_residual=True)),
}


def make_hf_model(name: str, seed: int = 0):
    """A random HF model of family `name` in eval mode (norm weights random too)."""
    import torch
    import transformers

    cls, kwargs = FAMILIES[name]
    if "text_config" in kwargs:  # a model wrapping a text model: the common sizes are the text model's
        text = {k: v for k, v in _common.items() if k != "attn_implementation"}
        kwargs = dict(kwargs, text_config={**text, **kwargs["text_config"]}, attn_implementation="eager")
        config = getattr(transformers, cls)(**kwargs)
    else:
        config = getattr(transformers, cls)(**{**_common, **kwargs})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or ("ln" in pname and p.ndim == 1):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model


def save_base(name: str, path):
    """`path` as the checkpoint of a random `make_hf_model(name)` with stand-in tokenizer files -> path."""
    make_hf_model(name).save_pretrained(path, safe_serialization=True)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (path / "tokenizer.json").write_text("{}")
    return path


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, seq))


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def our_logits(model, ids: np.ndarray | None = None) -> np.ndarray:
    """A jaxlora model's fp32 logits on `ids` (default `tokens()`), cut to the HF vocab."""
    import jax.numpy as jnp
    from flax import nnx

    ids = tokens() if ids is None else ids
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids, jnp.int32)))[..., :VOCAB]


def randomize_lora(model, seed: int = 1, scale: float = 0.1):
    """Give every LoRA A and B of a jaxlora model random values (B is zero after init)."""
    import jax
    from flax import nnx

    state = nnx.state(model, nnx.LoRAParam)
    rng = np.random.RandomState(seed)
    nnx.update(model, jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(x.dtype), state))
    return model
