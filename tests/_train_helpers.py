"""Tiny random models and synthetic token batches for the training-engine tests (f32, CPU)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models.config import ModelConfig
from jaxlora.models.gpt import GPT
from jaxlora.models.lora import LoRAConfig, lora_layers, split_lora
from jaxlora.training.step import IGNORE_INDEX

VOCAB = 100  # < padded vocab 128: exercises the masking of padding logits
TINY = ModelConfig.from_name("pythia-14m").replace(
    n_layer=2, n_embd=32, n_head=4, head_size=8, intermediate_size=64, vocab_size=VOCAB,
    padded_vocab_size=128, block_size=64)
LORA = LoRAConfig(r=4, alpha=8, dropout=0.1, query=True, value=True, mlp=True, head=True)


@functools.lru_cache(maxsize=None)
def fake_load_model(path, *, dtype, compute_dtype, lora, remat, **unused):
    """`jaxlora.load_model` for finetune job tests: random weights of the checkpoint dir's architecture (no
    weights file needed); the other choices (quantize, mesh, attention_impl, moe_dispatch) are left at defaults."""
    return GPT(ModelConfig.from_hf_config(path), lora, param_dtype=dtype, compute_dtype=compute_dtype,
               remat=remat, rngs=nnx.Rngs(0))


def tiny_split(dropout: float = 0.0):
    """-> (graphdef, lora_params, base_params) of a random 2-layer f32 model, LoRA B made non-zero.

    Cached and shared by every test of the session: never donate or mutate what it returns
    (`init_train_state` copies the LoRA arrays). Variants differ only in the LoRA dropout rate
    (the same weights), which avoids building a second model (slow on 2 cores).
    """
    if dropout != LORA.dropout:
        graphdef, lora_params, base = tiny_split(LORA.dropout)
        model = nnx.merge(graphdef, lora_params, base)
        for _, layer in lora_layers(model):
            layer.adapter.dropout = dropout
        return split_lora(model)
    model = GPT(TINY, LORA, param_dtype=jnp.float32, compute_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, lora_params, base = split_lora(model)
    # B starts at zero, which leaves A without gradient on step 1; perturb B so every leaf learns.
    pure = nnx.to_pure_dict(lora_params)
    _perturb_b(pure, np.random.default_rng(0))
    return graphdef, pure, base


def _perturb_b(tree: dict, rng) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            _perturb_b(value, rng)
        elif key == "lora_b":
            tree[key] = jnp.asarray(0.05 * rng.standard_normal(value.shape), value.dtype)


def random_batch(rng: np.random.Generator, shape: tuple[int, ...], prompt_len: int = 3,
                 pad_from: int | None = None) -> dict[str, np.ndarray]:
    """int32 tokens of `shape`; labels ignore the first `prompt_len` positions (and from `pad_from` on)."""
    ids = rng.integers(0, VOCAB, shape).astype(np.int32)
    labels = ids.copy()
    labels[..., :prompt_len] = IGNORE_INDEX
    if pad_from is not None:
        ids[..., pad_from:] = 0
        labels[..., pad_from:] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


class FixedBatches:
    """Cycles over a list of step batches forever; `position()` / start index make it resumable."""

    def __init__(self, batches: list[dict], index: int = 0):
        self.batches, self.index = batches, index

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        return batch

    def position(self) -> dict:
        return {"epoch": self.index // len(self.batches), "index": self.index % len(self.batches), "seed": 0}
