"""For tests that run jax in subprocesses with several (forced CPU) devices or processes: their
environment, a tiny random Llama checkpoint directory in HF layout (config.json, model.safetensors
written with numpy, a sentencepiece tokenizer) and a small instruction dataset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from _data_helpers import LLAMA2_TOKENIZER_CONFIG, make_sentencepiece_dir, write_json

# Test-speed XLA flags: cheaper LLVM optimisation (about half the compile time), same arithmetic.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def subprocess_env(devices: int) -> dict:
    """The environment of a CPU-only jax subprocess with `devices` devices that imports the test helpers."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return env


CONFIG = {"model_type": "llama", "vocab_size": 400, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def write_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """`directory` as an HF Llama checkpoint with random f32 weights ([out, in] linear weights)."""
    from safetensors.numpy import save_file

    c = CONFIG
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    rng = np.random.default_rng(seed)
    w = lambda *shape: (0.08 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    norm = lambda: (1.0 + 0.2 * rng.standard_normal(d)).astype(np.float32)  # noqa: E731
    tensors = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": norm(), "lm_head.weight": w(v, d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.k_proj.weight": w(kv, d),
            p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, d),
            p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
            p + "mlp.down_proj.weight": w(d, f)})
    make_sentencepiece_dir(directory, LLAMA2_TOKENIZER_CONFIG)
    write_json(directory / "config.json", c)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def write_dataset(path: Path, n: int = 24) -> Path:
    """`n` short Alpaca-style records as a JSON file."""
    words = "red green blue cat dog fish sun moon one two three four rain mat fox bird".split()
    records = [{"instruction": f"say {words[i % len(words)]} {words[(3 * i) % len(words)]}", "input": "",
                "output": f"{words[(5 * i) % len(words)]} {words[i % len(words)]}"} for i in range(n)]
    write_json(path, records)
    return path
