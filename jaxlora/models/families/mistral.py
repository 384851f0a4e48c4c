"""Mistral 7B v0.1 / v0.2 (HF `mistral`): Llama with an optional sliding window."""

from __future__ import annotations

from jaxlora.models.families import base


def from_hf(hf: dict) -> dict:
    fields = base.llama_fields(hf, "mistral")
    return dict(fields, **base.every_layer_window(hf, fields, "mistral"))


def to_hf(c) -> dict:
    return dict(base.llama_hf(c), sliding_window=c.sliding_window_size)


_shared = dict(vocab_size=32000, padded_vocab_size=32000, n_layer=32, n_embd=4096, n_head=32, n_query_groups=8,
               intermediate_size=14336)
# v0.1: the context and window of its config.json (max_position_embeddings 32768, sliding_window 4096)
_rows = [dict(name=n, block_size=32768, sliding_window_size=4096) for n in ("Mistral-7B-v0.1", "Mistral-7B-Instruct-v0.1")]
_rows += [dict(name=n, block_size=32768, rope_base=1000000.0) for n in ("Mistral-7B-v0.2", "Mistral-7B-Instruct-v0.2")]

FAMILY = base.Family(model_types=("mistral",), architecture="MistralForCausalLM", from_hf=from_hf, to_hf=to_hf,
                     key_map=base.llama_keys, presets=base.presets("mistral", _rows, **_shared))
