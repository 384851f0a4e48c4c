"""HF checkpoint export: every family round-trips (load_model -> save_hf_checkpoint -> transformers).

The written tensors must equal the original checkpoint's bit for bit (the export is the exact
inverse of the load key maps), so transformers' logits of the exported model equal those of the
original model up to 1e-6 (they are the same computation). Merged LoRA models: test_peft_interop
(`jaxlora merge`).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _hf_helpers import FAMILIES, hf_logits, our_logits, tokens  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import jaxlora  # noqa: E402
from jaxlora.checkpoints import hf_export  # noqa: E402
from jaxlora.checkpoints.hf_export import save_hf_checkpoint  # noqa: E402
from jaxlora.errors import CheckpointError  # noqa: E402


def _tensors(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(path / f)))
    return out


@pytest.fixture(scope="module")
def llama(hf_checkpoints):
    return jaxlora.load_model(hf_checkpoints["llama"][0])


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "gemma3-multimodal"])
def test_export_round_trip(hf_checkpoints, llama, name, tmp_path):
    path, hf_model = hf_checkpoints[name]
    model = llama if name == "llama" else jaxlora.load_model(path)
    out = save_hf_checkpoint(model, tmp_path / "out")
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    if name == "llama":  # the result has the mode of any new directory (not a private temporary one's)
        (tmp_path / "plain").mkdir()
        assert out.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    original, written = _tensors(path), _tensors(out)
    assert sorted(written) == sorted(original)
    for key, w in original.items():
        np.testing.assert_array_equal(written[key], w, err_msg=key)
    assert jaxlora.ModelConfig.from_hf_config(out).replace(name=model.config.name) == model.config
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = tokens()
    np.testing.assert_allclose(hf_logits(reloaded, ids), hf_logits(hf_model, ids), atol=1e-6, rtol=0)


def test_sharded_bf16_with_base_config(hf_checkpoints, llama, tmp_path):
    path, hf_model = hf_checkpoints["llama"]
    model = llama
    base_config = json.loads((path / "config.json").read_text())
    out = save_hf_checkpoint(model, tmp_path / "out", dtype="bfloat16", max_shard_bytes=8_000, hf_config=base_config)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(_tensors(path))
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["rope_parameters"] == base_config["rope_parameters"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == base_config["bos_token_id"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = tokens()
    np.testing.assert_allclose(hf_logits(reloaded.float(), ids), hf_logits(hf_model, ids), atol=5e-2, rtol=0)
    ours = our_logits(jaxlora.load_model(out, dtype="float32"), ids)
    np.testing.assert_allclose(ours, hf_logits(hf_model, ids), atol=5e-2, rtol=0)


def test_refuses_unmerged_adapters(llama, tmp_path):
    model = nnx.eval_shape(lambda: jaxlora.GPT(llama.config, jaxlora.LoRAConfig(r=2, query=True), rngs=nnx.Rngs(0)))
    with pytest.raises(CheckpointError, match="unmerged LoRA adapters .*merge_lora"):
        save_hf_checkpoint(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_config_of_another_model(hf_checkpoints, llama, tmp_path):
    other = json.loads((hf_checkpoints["mistral"][0] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="does not describe this model: it differs in model_type"):
        save_hf_checkpoint(llama, tmp_path / "out", hf_config=other)


def test_crash_leaves_no_directory(llama, tmp_path, monkeypatch):
    model = llama

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_export, "write_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        save_hf_checkpoint(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_refuses_non_empty_output_directory(llama, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists and is not an empty directory"):
        save_hf_checkpoint(llama, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["notes.txt"]


def test_gemma3_vision_language_checkpoint_exports_its_text_model(hf_checkpoints, tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (4B and larger) loads as its text model and exports as a
    gemma3_text checkpoint: Gemma3ForCausalLM loads it with the same text logits; the written tensors are the
    text model's, byte for byte."""
    path, hf_model = hf_checkpoints["gemma3-multimodal"]
    model = jaxlora.load_model(path)
    assert model.config.model_type == "gemma3"
    out = save_hf_checkpoint(model, tmp_path / "out", hf_config=json.loads((path / "config.json").read_text()))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    original = {k.replace("language_model.model.", "model."): v for k, v in _tensors(path).items()
                if k.startswith("language_model.")}
    written = _tensors(out)
    assert sorted(written) == sorted(original)
    for key, w in original.items():
        np.testing.assert_array_equal(written[key], w, err_msg=key)
    text_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(text_model).__name__ == "Gemma3ForCausalLM"
    ids = tokens()
    np.testing.assert_allclose(hf_logits(text_model, ids), hf_logits(hf_model, ids), atol=1e-5, rtol=0)
