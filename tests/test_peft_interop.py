"""PEFT adapters both ways, `jaxlora merge` and `jaxlora export-peft`, against transformers + peft (fp32, CPU).

Every LoRA A and B is random and non-zero, so a misplaced row, a transposition or a wrong scale
shows. Our logits and PEFT's agree to 1e-4 (different op orders, as in test_hf_parity);
jaxlora -> PEFT -> jaxlora gives back the same arrays exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from _hf_helpers import hf_logits, make_hf_model, our_logits, randomize_lora, save_base, tokens  # noqa: E402
from flax import nnx  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402

import jaxlora  # noqa: E402
from jaxlora.checkpoints.adapters import load_with_adapter, read_adapter  # noqa: E402
from jaxlora.checkpoints.peft import save_peft_adapter  # noqa: E402
from jaxlora.cli import main  # noqa: E402
from jaxlora.errors import CheckpointError  # noqa: E402
from jaxlora.finetune import save_lora_safetensors  # noqa: E402

ATOL = 1e-4
ALL = dict(query=True, key=True, value=True, projection=True, mlp=True, head=True)
# family -> LoRA settings: fused q/k/v with some parts off (GPT-NeoX, Falcon), every fused module (Phi-3,
# with rsLoRA: alpha * sqrt(k)), a tied head (Qwen2), a head saved under a legacy name (GPT-NeoX).
CASES = {
    "llama": jaxlora.LoRAConfig(r=4, alpha=8, **ALL),
    "phi3": jaxlora.LoRAConfig(r=2, alpha=3, use_rslora=True, **ALL),
    "gpt_neox": jaxlora.LoRAConfig(r=4, alpha=16, query=True, value=True, mlp=True, head=True),
    "falcon-new-arch": jaxlora.LoRAConfig(r=2, alpha=4, key=True, projection=True),
    "qwen2": jaxlora.LoRAConfig(r=3, alpha=6, query=True, value=True, head=True),
    # the second wave: QK-norm (Qwen3 with a tied head, Gemma 3, OLMo 2's full-projection norm, StableLM's per-head
    # norm), NoPE layers (SmolLM3), multipliers (Granite), an MoE's attention (Qwen3-MoE)
    "qwen3": jaxlora.LoRAConfig(r=2, alpha=4, **ALL),
    "gemma3": jaxlora.LoRAConfig(r=2, alpha=4, query=True, key=True, value=True, projection=True, mlp=True),
    "olmo2": jaxlora.LoRAConfig(r=2, alpha=4, **ALL),
    "smollm3": jaxlora.LoRAConfig(r=2, alpha=4, query=True, value=True, mlp=True),
    "granite": jaxlora.LoRAConfig(r=2, alpha=4, **ALL),
    "stablelm": jaxlora.LoRAConfig(r=2, alpha=4, **ALL),
    "qwen3_moe": jaxlora.LoRAConfig(r=2, alpha=4, query=True, key=True, value=True, projection=True),
    # PEFT keys of the vision-language model's text model (model.language_model.*)
    "gemma3-multimodal": jaxlora.LoRAConfig(r=2, alpha=4, query=True, value=True, mlp=True),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family -> base checkpoint dir (with fake tokenizer files)."""
    out = {}
    for name in CASES:
        out[name] = save_base(name, tmp_path_factory.mktemp(name))
    return out


@pytest.fixture(scope="module")
def adapted(bases):
    """family -> (jaxlora model with random adapters, its logits on `tokens()`)."""
    out = {}
    for name, lora in CASES.items():
        model = randomize_lora(jaxlora.load_model(bases[name], lora=lora))
        out[name] = (model, our_logits(model))
    return out


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", list(CASES))
def test_peft_export_matches_and_round_trips(bases, adapted, name, tmp_path):
    model, ours = adapted[name]
    out = save_peft_adapter(model, tmp_path / "peft", base_model_name_or_path=str(bases[name]))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == model.lora.r and config["bias"] == "none"
    peft_model = peft.PeftModel.from_pretrained(_hf(bases[name]), out).eval()
    np.testing.assert_allclose(hf_logits(peft_model, tokens()), ours, atol=ATOL, rtol=0)

    lora, params = read_adapter(bases[name], out)
    assert lora == model.lora
    expected = flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)), sep=".")
    got = flatten_dict(params, sep=".")
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], np.asarray(value), err_msg=key)


def test_fused_target_names_and_rank_patterns(adapted, tmp_path):
    config = json.loads((save_peft_adapter(adapted["phi3"][0], tmp_path / "p") / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_up_proj", "lm_head", "o_proj", "qkv_proj"]
    assert config["rank_pattern"] == {"qkv_proj": 6, "gate_up_proj": 4}
    assert config["alpha_pattern"] == pytest.approx({"qkv_proj": 3 * 3 ** 0.5, "gate_up_proj": 3 * 2 ** 0.5})


@pytest.mark.parametrize("name, targets", [("gpt_neox", ["query_key_value", "dense_h_to_4h"]),
                                           ("phi3", ["qkv_proj", "gate_up_proj", "o_proj"])])
def test_peft_trained_adapter_loads(bases, name, targets, tmp_path):
    """A fused adapter trained in PEFT (dense A and B of rank r) loads into rank-r q/k/v (and gate/up) adapters;
    MLP matrices PEFT did not adapt get zero adapters."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(_hf(bases[name]), config).eval()
    peft_model.save_pretrained(tmp_path / "a")
    model = load_with_adapter(bases[name], tmp_path / "a")
    assert model.lora.r == 4 and model.lora.alpha == 8 and set(model.lora.targets) >= {"query", "key", "value", "mlp"}
    ours = our_logits(model)
    np.testing.assert_allclose(ours, hf_logits(peft_model, tokens()), atol=ATOL, rtol=0)


def test_merge_cli_from_run_dir(bases, adapted, tmp_path):
    model, ours = adapted["phi3"]
    lora_state = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    save_lora_safetensors(lora_state, tmp_path / "run" / "final" / "lora.safetensors",
                          metadata={"lora": json.dumps(model.lora.__dict__)})
    assert main(["merge", "--checkpoint_dir", str(bases["phi3"]), "--adapter", str(tmp_path / "run"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged"
    assert (merged / "tokenizer.json").is_file() and (merged / "tokenizer_config.json").is_file()
    assert json.loads((merged / "config.json").read_text()) == json.loads((bases["phi3"] / "config.json").read_text())
    np.testing.assert_allclose(hf_logits(_hf(merged), tokens()), ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "gemma3-multimodal", "olmo2", "smollm3", "granite", "stablelm",
                                  "qwen3_moe"])
def test_merged_checkpoint_matches_the_adapted_model(bases, adapted, name, tmp_path):
    """merge_lora + save_hf_checkpoint of every second-wave family: transformers gives the adapted logits
    (Qwen3's adapter on its tied head unties it: the checkpoint gets its own lm_head.weight)."""
    model, ours = adapted[name]
    out = jaxlora.save_hf_checkpoint(jaxlora.merge_lora(model), tmp_path / "merged")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == (model.config.tie_embeddings and not model.lora.head)
    np.testing.assert_allclose(hf_logits(_hf(out), tokens()), ours, atol=ATOL, rtol=0)


def test_merge_cli_unties_a_tied_head_adapter(bases, adapted, tmp_path):
    """`jaxlora merge` of an adapter on a tied head (the Gemma recipes train lora_head): the written config.json
    is the base's with tie_word_embeddings false, and transformers gives the adapted logits."""
    model, ours = adapted["qwen2"]
    assert model.config.tie_embeddings and model.lora.head
    save_peft_adapter(model, tmp_path / "peft")
    assert main(["merge", "--checkpoint_dir", str(bases["qwen2"]), "--adapter", str(tmp_path / "peft"),
                 "--out", str(tmp_path / "merged")]) == 0
    base_config = json.loads((bases["qwen2"] / "config.json").read_text())
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged_config == {**base_config, "tie_word_embeddings": False}
    np.testing.assert_allclose(hf_logits(_hf(tmp_path / "merged"), tokens()), ours, atol=ATOL, rtol=0)


def test_export_peft_cli(bases, adapted, tmp_path):
    model, ours = adapted["gpt_neox"]
    lora_file = tmp_path / "lora.safetensors"
    save_lora_safetensors(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)), lora_file,
                          metadata={"lora": json.dumps(model.lora.__dict__)})
    assert main(["export-peft", "--checkpoint_dir", str(bases["gpt_neox"]), "--adapter", str(lora_file),
                 "--out", str(tmp_path / "peft")]) == 0
    peft_model = peft.PeftModel.from_pretrained(_hf(bases["gpt_neox"]), tmp_path / "peft").eval()
    np.testing.assert_allclose(hf_logits(peft_model, tokens()), ours, atol=ATOL, rtol=0)


def test_mixtral_expert_lora_exports_as_target_parameters(tmp_path):
    """LoRA on Mixtral's experts (fused 3-D parameters in transformers 5) is written as PEFT's target_parameters
    (parity with transformers + peft: test_moe_peft.py)."""
    from jaxlora.checkpoints.peft import lora_shapes, write_peft_adapter

    config = jaxlora.ModelConfig.from_hf_config(make_hf_model("mixtral").config.to_dict())
    lora = jaxlora.LoRAConfig(r=2, mlp=True)
    params = {k: np.ones(v.shape, np.float32) for k, v in flatten_dict(lora_shapes(config, lora), sep="/").items()}
    out = write_peft_adapter(config, lora, unflatten_dict(params, sep="/"), tmp_path / "p")
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["target_modules"] == []
    assert adapter["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_adapter_of_another_model_is_refused(bases, adapted, tmp_path, capsys):
    model = adapted["llama"][0]
    save_lora_safetensors(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)), tmp_path / "lora.safetensors",
                          metadata={"lora": json.dumps(model.lora.__dict__)})
    with pytest.raises(SystemExit) as e:
        main(["merge", "--checkpoint_dir", str(bases["gpt_neox"]), "--adapter", str(tmp_path / "lora.safetensors"),
              "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no tensor for LoRA parameter blocks.mlp.fc.adapter.lora_a" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_inexpressible_peft_adapters_are_refused(bases, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value", "dense"], rank_pattern={"dense": 2})
    peft.get_peft_model(_hf(bases["gpt_neox"]), config).save_pretrained(tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"several ranks or alphas .*r=2.*r=4.*jaxlora model has one"):
        read_adapter(bases["gpt_neox"], tmp_path / "a")
    with pytest.raises(CheckpointError, match="adapts module gpt_neox.layers.0.attention.dense, which jaxlora cannot "
                                              "adapt for model_type 'phi3'"):
        read_adapter(bases["phi3"], tmp_path / "a")


def test_vision_language_adapter_targets_only_the_text_model(bases, adapted, tmp_path):
    """Gemma 3's vision tower has q_proj/v_proj too: the exported target_modules name the text model's exact
    modules, so PEFT adds no (empty) adapters to the vision tower and reports no missing keys."""
    import re
    import warnings

    model, ours = adapted["gemma3-multimodal"]
    out = save_peft_adapter(model, tmp_path / "peft")
    target = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(target, str) and re.fullmatch(target, "model.language_model.layers.1.self_attn.q_proj")
    assert not re.fullmatch(target, "model.vision_tower.encoder.layers.0.self_attn.q_proj")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(_hf(bases["gemma3-multimodal"]), out).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert not any("vision_tower" in name and "lora_" in name for name, _ in peft_model.named_parameters())
    np.testing.assert_allclose(hf_logits(peft_model, tokens()), ours, atol=ATOL, rtol=0)
