"""SmolLM3 (HF `smollm3`): Llama with no RoPE on every n-th layer (NoPE)."""

from __future__ import annotations

from jaxlora.models.families import base


def from_hf(hf: dict) -> dict:
    fields = base.llama_fields(hf, "smollm3", eps_default=1e-6)
    n = fields["n_layer"]
    # no_rope_layers[i] == 1: layer i uses RoPE (transformers' default: every no_rope_layer_interval-th has none)
    uses_rope = hf.get("no_rope_layers") or [int((i + 1) % hf.get("no_rope_layer_interval", 4) != 0) for i in range(n)]
    if len(uses_rope) != n:
        raise base.CheckpointError(f"smollm3 config.json no_rope_layers has {len(uses_rope)} entries for {n} layers")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    bias = bool(hf.get("attention_bias", False))
    return dict(fields, nope_layers=tuple(i for i, r in enumerate(uses_rope) if not r), attn_bias=bias,
                attn_out_bias=bias, bias=bool(hf.get("mlp_bias", False)),
                # transformers: with use_sliding_window, the layers without RoPE slide
                **base.attention_layout(hf, n, fields["block_size"], "smollm3", window=window,
                                        sliding=[not r for r in uses_rope]))


def to_hf(c) -> dict:
    return dict(base.llama_hf(c), attention_bias=c.attn_bias, mlp_bias=c.bias,
                no_rope_layers=[int(i not in c.nope_layers) for i in range(c.n_layer)],
                use_sliding_window=c.sliding_window_size is not None, sliding_window=c.sliding_window_size,
                layer_types=base.layer_types_hf(c))


FAMILY = base.Family(model_types=("smollm3",), architecture="SmolLM3ForCausalLM", from_hf=from_hf, to_hf=to_hf,
                     key_map=base.llama_keys, tie_default=True,
                     presets=base.presets("smollm3", [dict(
                         name="SmolLM3-3B", vocab_size=128256, padded_vocab_size=128256, n_layer=36, n_embd=2048,
                         n_head=16, n_query_groups=4, intermediate_size=11008, block_size=65536, rope_base=5000000.0,
                         norm_eps=1e-6, tie_embeddings=True, nope_layers=tuple(range(3, 36, 4)))]))
