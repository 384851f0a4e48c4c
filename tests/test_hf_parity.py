"""Parity with HF transformers (PyTorch, CPU, fp32) on tiny random configs of every supported family.

Each case builds a 2-layer HF model with random weights (norm weights too, so a wrong norm
mapping or a missing unit offset shows), saves it with `save_pretrained(safe_serialization=True)`,
loads it with `jaxlora.load_model` and compares fp32 logits on the same tokens.
Tolerance: 1e-4 absolute. Both sides compute in fp32 with different op orders (fused attention
vs eager softmax, einsum vs matmul); the observed differences are ~1e-7 to 1e-6 on logits of
magnitude ~1, so 1e-4 leaves margin without hiding a mapping error (those give errors ~1e-1).
"""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxlora  # noqa: E402
from jaxlora.errors import CheckpointError  # noqa: E402

from _hf_helpers import FAMILIES, VOCAB  # noqa: E402
from _hf_helpers import hf_logits as _hf_logits  # noqa: E402
from _hf_helpers import tokens as _tokens  # noqa: E402

ATOL = 1e-4


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(hf_checkpoints, name, caplog):
    path, hf_model = hf_checkpoints[name]
    with caplog.at_level("WARNING", logger="jaxlora.checkpoints.hf"):
        model = jaxlora.load_model(path, dtype="float32")
    assert not caplog.records  # the key map reads every tensor the checkpoint holds
    ids = _tokens()
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    ref = _hf_logits(hf_model, ids)
    assert ours.shape[-1] >= VOCAB
    np.testing.assert_allclose(ours[..., :VOCAB], ref, atol=ATOL, rtol=0)


def _legacy(config: dict) -> dict:
    """transformers 5's config.json in the key format of the Hub checkpoints written before it: rope_theta,
    rope_scaling (and Gemma 3's rope_local_base_freq), partial_rotary_factor / GPT-NeoX's rotary_pct at the top."""
    config = dict(config)
    rope = config.pop("rope_parameters", None)
    if rope is None:
        return config
    if set(rope) <= {"full_attention", "sliding_attention"}:  # Gemma 3: per layer type
        config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = dict(rope["full_attention"])
    rope = dict(rope)
    config["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        key = "rotary_pct" if config["model_type"] == "gpt_neox" else "partial_rotary_factor"
        config[key] = rope.pop("partial_rotary_factor")
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope
    return config


@pytest.mark.parametrize("name", list(FAMILIES))
def test_legacy_config_json_gives_the_same_model(hf_checkpoints, name, tmp_path):
    """Most Hub checkpoints carry the older config.json keys; they describe the same model."""
    path, _ = hf_checkpoints[name]
    config = json.loads((path / "config.json").read_text())
    legacy = _legacy(config)
    assert legacy != config or "rope_parameters" not in config
    assert jaxlora.ModelConfig.from_hf_config(legacy) == jaxlora.ModelConfig.from_hf_config(config)


@pytest.mark.parametrize("name", ["qwen2-window-layers", "smollm3", "gemma2", "mistral"])
def test_layer_types_derived_as_transformers_does(hf_checkpoints, name, tmp_path):
    """Without `layer_types` (older config.json), which layers slide follows the family's own rule
    (Qwen2: from max_window_layers on; SmolLM3: the RoPE layers; Gemma 2: even layers); the logits match."""
    path, hf_model = hf_checkpoints[name]
    config = json.loads((path / "config.json").read_text())
    config.pop("layer_types", None)
    shutil.copytree(path, tmp_path / name)
    (tmp_path / name / "config.json").write_text(json.dumps(config))
    model = jaxlora.load_model(tmp_path / name)
    ids = _tokens()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids, jnp.int32)))[..., :VOCAB], _hf_logits(hf_model, ids),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt_neox"])
def test_right_padding_matches_unpadded(hf_checkpoints, name):
    """Padding is masked: real-token logits of a right-padded row equal the unpadded row's."""
    path, hf_model = hf_checkpoints[name]
    model = jaxlora.load_model(path, dtype="float32")
    ids = _tokens(batch=2)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask)))
    alone = _hf_logits(hf_model, ids[1:, :7])
    np.testing.assert_allclose(ours[1, :7, :VOCAB], alone[0], atol=ATOL, rtol=0)


def test_left_padding_matches_unpadded(hf_checkpoints):
    path, hf_model = hf_checkpoints["llama"]
    model = jaxlora.load_model(path, dtype="float32")
    ids = _tokens(batch=1)
    padded = np.concatenate([np.zeros((1, 3), ids.dtype), ids[:, :9]], axis=1)
    mask = np.concatenate([np.zeros((1, 3), int), np.ones((1, 9), int)], axis=1)
    ours = np.asarray(model(jnp.asarray(padded, jnp.int32), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(ours[0, 3:, :VOCAB], _hf_logits(hf_model, ids[:, :9])[0], atol=ATOL, rtol=0)


def test_bf16_load_is_close(hf_checkpoints):
    """bf16 frozen weights and compute: same argmax almost everywhere, logits within bf16 error."""
    path, hf_model = hf_checkpoints["llama"]
    model = jaxlora.load_model(path, dtype="bfloat16")
    ids = _tokens()
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    assert ours.dtype == np.float32  # logits are fp32 whatever the compute dtype
    np.testing.assert_allclose(ours[..., :VOCAB], _hf_logits(hf_model, ids), atol=5e-2, rtol=0)


def test_sharded_checkpoint(hf_checkpoints, tmp_path):
    """A sharded checkpoint (index + several files) loads to the same logits."""
    _, hf_model = hf_checkpoints["llama"]
    hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = jaxlora.load_model(tmp_path)
    ids = _tokens()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids, jnp.int32)))[..., :VOCAB], _hf_logits(hf_model, ids),
                               atol=ATOL, rtol=0)


def test_scan_and_unrolled_layers_agree(hf_checkpoints):
    path, _ = hf_checkpoints["gemma2"]
    ids = jnp.asarray(_tokens(), jnp.int32)
    scanned = jaxlora.load_model(path)(ids)
    unrolled = jaxlora.load_model(path, scan_layers=False)(ids)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), atol=1e-5, rtol=0)


# --- bad checkpoints: one sentence naming what is wrong


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        jaxlora.load_model(tmp_path / "nope")


def test_missing_weights(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints["llama"]
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        jaxlora.load_model(tmp_path)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "vocab_size": 10}')
    with pytest.raises(CheckpointError, match="unsupported model_type 'bert'.*supported: falcon, .*llama"):
        jaxlora.load_model(tmp_path)


def _rewrite(src, dst, edit):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_missing_tensor_is_named(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints["llama"]
    _rewrite(path, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        jaxlora.load_model(tmp_path)


def test_unused_tensors_are_reported(hf_checkpoints, tmp_path, caplog):
    """A tensor the model has no place for (here a Llama o_proj bias, which HF's attention_bias adds)
    is named in a warning rather than dropped silently; buffers such as rotary inv_freq are not."""
    path, _ = hf_checkpoints["llama"]

    def add(t):
        t["model.layers.0.self_attn.o_proj.bias"] = np.ones(32, np.float32)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)

    _rewrite(path, tmp_path, add)
    with caplog.at_level("WARNING", logger="jaxlora.checkpoints.hf"):
        jaxlora.load_model(tmp_path)
    assert len(caplog.records) == 1
    assert "1 tensor(s)" in caplog.text and "model.layers.0.self_attn.o_proj.bias" in caplog.text
    assert "inv_freq" not in caplog.text


def test_misshaped_tensor_names_both_shapes(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints["llama"]

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]

    _rewrite(path, tmp_path, shrink)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight has shape \[8, 32\] but the config.json implies "
                                              r"\[16, 32\]"):
        jaxlora.load_model(tmp_path)


def test_corrupt_safetensors(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints["llama"]
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        jaxlora.load_model(tmp_path)
