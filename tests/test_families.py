"""The family registry: every family is one registered module whose presets round-trip through config.json;
config.json fields jaxlora does not implement are refused in one sentence naming them; the second-wave
families train (a few LoRA steps on tiny random checkpoints lower the loss)."""

from __future__ import annotations

import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlora
from jaxlora.errors import CheckpointError
from jaxlora.models import families
from jaxlora.models.config import ModelConfig
from jaxlora.models.lora import split_lora
from jaxlora.training.step import init_train_state, make_train_step

def test_every_family_module_is_registered():
    """Each module's families are in the registry under each model_type they read."""
    import importlib

    for name in {m.name for m in pkgutil.iter_modules(families.__path__)} - {"base"}:
        module = importlib.import_module(f"{families.__name__}.{name}")
        for family in getattr(module, "FAMILIES", None) or (module.FAMILY,):
            assert all(families.FAMILIES[t] is family for t in family.model_types), name
    assert {"llama", "qwen3", "qwen3_moe", "gemma3_text", "gemma3", "olmo2", "smollm3", "granite",
            "stablelm"} <= set(families.SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("name", sorted(families.PRESETS))
def test_presets_round_trip_through_config_json(name):
    preset = families.PRESETS[name]
    back = ModelConfig.from_hf_config(families.hf_config_dict(preset))
    assert back.replace(name=preset.name, vocab_size=preset.vocab_size) == preset


def _llama(**fields) -> dict:
    return dict(model_type="llama", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, **fields)


@pytest.mark.parametrize("hf, match", [
    (_llama(rope_scaling={"rope_type": "su", "factor": 2.0}), r"rope_type 'su'.*supported: default, linear"),
    (_llama(rope_scaling={"rope_type": "yarn", "factor": 2.0, "foo_factor": 1.0}), r"key 'foo_factor'"),
    (_llama(rope_scaling={"rope_type": "linear"}), r"factor"),
    (_llama(hidden_act="gelu"), r"llama config.json field hidden_act='gelu'"),
    (dict(_llama(), model_type="qwen3", layer_types=["full_attention", "chunked_attention"]), r"layer_types"),
    (dict(_llama(), model_type="qwen3_moe", moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
          mlp_only_layers=[1]), r"mlp_only_layers"),
    (dict(_llama(), model_type="gemma3_text", head_dim=8, rope_parameters={
        "full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     r"RoPE scaling 'linear' on the sliding layers"),
    (dict(_llama(), model_type="gpt_neox", attention_bias=False), r"attention_bias=False"),
    (dict(_llama(), model_type="phi", qk_layernorm=True), r"qk_layernorm"),
    (dict(_llama(), model_type="mllama"),
     r"unsupported model_type 'mllama' in config.json; supported: falcon, gemma, .*, llama, .*, stablelm$"),
    (dict(model_type="gemma3", text_config=None), r"config.json of model_type 'gemma3' has no 'vocab_size' field"),
])
def test_unimplemented_fields_are_refused(hf, match):
    with pytest.raises(CheckpointError, match=match) as info:
        ModelConfig.from_hf_config(hf)
    assert "\n" not in str(info.value)


def test_a_refused_rope_type_stops_load_model(tmp_path):
    (tmp_path / "config.json").write_text(__import__("json").dumps(_llama(rope_scaling={"rope_type": "mrope"})))
    with pytest.raises(CheckpointError, match="rope_type 'mrope'"):
        jaxlora.load_model(tmp_path)


def test_gemma_v1_legacy_gelu_is_the_tanh_approximation(hf_checkpoints, tmp_path):
    """Gemma v1.0 repos say hidden_act "gelu" (and no hidden_activation); transformers, like Gemma's reference,
    runs the tanh approximation: the logits of such a config.json match the HF model's (exact GELU would not)."""
    import json
    import shutil

    from _hf_helpers import hf_logits, our_logits, tokens

    path, hf_model = hf_checkpoints["gemma"]
    shutil.copytree(path, tmp_path / "gemma")
    config = json.loads((tmp_path / "gemma" / "config.json").read_text())
    config.pop("hidden_activation", None)
    (tmp_path / "gemma" / "config.json").write_text(json.dumps(dict(config, hidden_act="gelu")))
    model = jaxlora.load_model(tmp_path / "gemma")
    assert model.config.gelu_approximate
    np.testing.assert_allclose(our_logits(model), hf_logits(hf_model, tokens()), atol=1e-4, rtol=0)


NEW = ["qwen3", "qwen3_moe", "gemma3", "olmo2", "smollm3", "granite", "stablelm"]


@pytest.mark.parametrize("name", NEW)
def test_new_families_train(hf_checkpoints, name):
    """Five AdamW steps of LoRA on every linear layer (f32) lower the loss of a fixed batch."""
    path, _ = hf_checkpoints[name]
    lora = jaxlora.LoRAConfig(r=4, alpha=8, query=True, key=True, value=True, projection=True, head=True,
                              mlp=name != "qwen3_moe")
    model = jaxlora.load_model(path, lora=lora)
    graphdef, lora_params, base = split_lora(model)
    tx = optax.adam(1e-2)
    step = make_train_step(graphdef, tx, accum_steps=1)
    state = init_train_state(lora_params, tx)
    ids = np.random.default_rng(0).integers(0, 64, (1, 2, 12)).astype(np.int32)
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids)}
    losses = []
    for _ in range(5):
        state, metrics = step(state, base, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("name", NEW + ["gemma3-multimodal", "phi3-longrope"])
def test_new_families_generate_as_the_full_forward(hf_checkpoints, name):
    """Greedy KV-cache generation (3 prompt tokens, 7 new: past every window and RoPE switch of the tiny configs)
    picks, at every step, the argmax of the full forward over the tokens so far (fp32)."""
    from jaxlora.generate import generate

    path, _ = hf_checkpoints[name]
    model = jaxlora.load_model(path)
    prompt = np.array([5, 17, 42], np.int32)
    (out,) = generate(model, [prompt], max_new_tokens=7, prompt_bucket=4)
    seq = jnp.asarray(np.concatenate([prompt, out])[None])
    forward = nnx.jit(lambda m, mask: m(seq, attention_mask=mask))  # each prefix right-padded to one shape
    expected = [int(np.asarray(forward(model, jnp.arange(seq.shape[1])[None] < n))[0, n - 1, :64].argmax())
                for n in range(3, seq.shape[1])]
    assert out.tolist() == expected
