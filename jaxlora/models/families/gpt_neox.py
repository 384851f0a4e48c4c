"""Pythia and StableLM-Alpha (HF `gpt_neox`): fused grouped qkv, LayerNorm, partial rotary, GELU MLP."""

from __future__ import annotations

from jaxlora.models.families import base
from jaxlora.models.families.base import Source, linear, norm


def from_hf(hf: dict) -> dict:
    # attention_bias switches the attention biases only (the MLP always has them); jaxlora has one switch
    base.require(hf, "attention_bias", (True,), True, "gpt_neox")
    return dict(
        n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"], n_head=hf["num_attention_heads"],
        n_query_groups=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        block_size=hf.get("max_position_embeddings", 2048), norm_class="LayerNorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5), parallel_residual=bool(hf.get("use_parallel_residual", True)),
        rotary_percentage=base.partial_rotary(hf, 0.25, legacy="rotary_pct"),
        rope_base=float(hf.get("rotary_emb_base") or base.rope_base(hf)), rope_scaling=base.rope_scaling(hf, "gpt_neox"),
        bias=True, mlp_class="GptNeoxMLP",
        gelu_approximate=base.gelu_approximate(hf.get("hidden_act", "gelu"), "gpt_neox"),
    )


def to_hf(c) -> dict:
    return dict(intermediate_size=c.intermediate_size, rotary_pct=c.rotary_percentage, rotary_emb_base=c.rope_base,
                use_parallel_residual=c.parallel_residual, attention_bias=True, layer_norm_eps=c.norm_eps,
                hidden_act="gelu_new" if c.gelu_approximate else "gelu", **base.rope_scaling_hf(c))


def key_map(c) -> base.KeyMap:
    p = "gpt_neox.layers.{i}."
    qkv = lambda part: linear(p + "attention.query_key_value", part=("qkv", part, "grouped"))
    block = {"norm_1": norm(p + "input_layernorm"), "norm_2": norm(p + "post_attention_layernorm"),
             "attn": {"q": qkv("q"), "k": qkv("k"), "v": qkv("v"), "proj": linear(p + "attention.dense")},
             "mlp": {"fc": linear(p + "mlp.dense_h_to_4h"), "proj": linear(p + "mlp.dense_4h_to_h")}}
    # The module is `lm_head` since transformers 5; checkpoints (Pythia on the Hub, and save_pretrained)
    # name its weight `embed_out`.
    head = {"kernel": Source(("lm_head.weight", "embed_out.weight"), transpose=True),
            "bias": Source(("lm_head.bias", "embed_out.bias"))}
    return {"wte": Source(("gpt_neox.embed_in.weight",)), "ln_f": norm("gpt_neox.final_layer_norm"),
            "lm_head": head}, block


_shared = dict(norm_class="LayerNorm", parallel_residual=True, bias=True, mlp_class="GptNeoxMLP", rotary_percentage=0.25)
_rows = [dict(name="stablelm-base-alpha-3b", vocab_size=50254, padded_vocab_size=50688, n_layer=16, n_embd=4096,
              n_head=32, n_query_groups=32, intermediate_size=16384, block_size=4096),
         dict(name="stablelm-base-alpha-7b", vocab_size=50254, padded_vocab_size=50432, n_layer=16, n_embd=6144,
              n_head=48, n_query_groups=48, intermediate_size=24576, block_size=4096)]
_rows += [dict(name=n, vocab_size=50254, padded_vocab_size=pad, n_layer=l, n_embd=e, n_head=h, n_query_groups=h,
               intermediate_size=4 * e, block_size=ctx)
          for n, l, e, h, ctx, pad in (
              ("pythia-14m", 6, 128, 4, 512, 50304), ("pythia-31m", 6, 256, 8, 1024, 50304),
              ("pythia-70m", 6, 512, 8, 2048, 50304), ("pythia-160m", 12, 768, 12, 2048, 50304),
              ("pythia-410m", 24, 1024, 16, 2048, 50304), ("pythia-1b", 16, 2048, 8, 2048, 50304),
              ("pythia-1.4b", 24, 2048, 16, 2048, 50304), ("pythia-2.8b", 32, 2560, 32, 2048, 50304),
              ("pythia-6.9b", 32, 4096, 32, 2048, 50432), ("pythia-12b", 36, 5120, 40, 2048, 50688))]

FAMILY = base.Family(model_types=("gpt_neox",), architecture="GPTNeoXForCausalLM", from_hf=from_hf, to_hf=to_hf,
                     key_map=key_map, presets=base.presets("gpt_neox", _rows, **_shared))
