"""Choosing adapted layers by path pattern (`lora_targets`) and ranks by `lora_rank_pattern`, PEFT's
target_modules / rank_pattern; LoRA+; and the one-sentence refusals of bad settings."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora.config import base_config, lora_config, validate
from jaxlora.errors import ConfigError
from jaxlora.models.lora import LoRAConfig, lora_layers
from jaxlora.training.optim import make_optimizer
from jaxlora.training.step import init_train_state

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _adapted(lora: LoRAConfig, config=None) -> dict[str, int]:
    config = config or jaxlora.ModelConfig.from_name("pythia-14m")
    model = nnx.eval_shape(lambda: jaxlora.GPT(config, lora, rngs=nnx.Rngs(0)))
    return {".".join(map(str, p)): layer.adapter.rank for p, layer in lora_layers(model)}


def test_path_pattern_and_rank_pattern_pick_layers_and_ranks():
    config = jaxlora.ModelConfig.from_name("Llama-3.2-1B").replace(n_layer=2)
    switches = _adapted(LoRAConfig(r=8, query=True, value=True), config)
    assert switches == {"blocks.attn.q": 8, "blocks.attn.v": 8}
    assert _adapted(LoRAConfig(r=8, target_pattern=r"blocks\.attn\.(q|v)"), config) == switches
    # the pattern alone decides (the switches are ignored); fullmatch, as PEFT's string target_modules
    assert _adapted(LoRAConfig(r=8, query=True, target_pattern=r".*mlp\.fc_\d"), config) == {
        "blocks.mlp.fc_1": 8, "blocks.mlp.fc_2": 8}
    ranks = _adapted(LoRAConfig(r=8, alpha=16, target_pattern=r".*(attn\.[qv]|lm_head)",
                                rank_pattern=(("attn.q", 16), ("lm_head", 2))), config)
    assert ranks == {"blocks.attn.q": 16, "blocks.attn.v": 8, "lm_head": 2}
    lora = LoRAConfig(r=8, alpha=16, rank_pattern=(("q", 4),), query=True)
    assert lora.rank_at("blocks.attn.q", "query") == 4 and lora.scale_for(4) == 4.0  # alpha / the layer's rank


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_pattern="attn.(q"), r"the LoRA path pattern 'attn.\(q' is not a valid regular expression"),
    (dict(rank_pattern=(("q", 0),)), "lora_rank_pattern gives 'q' rank 0; ranks must be >= 1"),
])
def test_bad_patterns_are_one_sentence(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoRAConfig(r=8, query=True, **kwargs)


def _cfg(tmp_path, **overrides):
    cfg = base_config()
    cfg.checkpoint_dir = str(tmp_path)
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


@pytest.mark.parametrize("overrides,match", [
    (dict(quantize="nf5"), "quantize must be one of .*bnb.nf4.*, got 'nf5'"),
    (dict(lora_rank_pattern=["q", 4]), "lora_rank_pattern must be a dict of regex -> integer rank"),
    (dict(lora_targets="(", lora_query=False), "is not a valid regular expression"),
    (dict(lora_query=False, lora_value=False), "set at least one of .* to true, or lora_targets"),
    (dict(**{"optimizer.lora_plus_ratio": 0.0}), "optimizer.lora_plus_ratio must be > 0"),
])
def test_bad_adapter_configs_are_refused(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(_cfg(tmp_path, **overrides))


def test_config_to_lora_config(tmp_path):
    cfg = _cfg(tmp_path, lora_targets=r".*attn\.(q|k)", lora_rank_pattern={"attn.k": 4}, use_dora=True,
               lora_query=False, lora_value=False)
    validate(cfg)
    lora = lora_config(cfg)
    assert (lora.target_pattern, lora.rank_pattern, lora.use_dora) == (r".*attn\.(q|k)", (("attn.k", 4),), True)
    # it survives the JSON metadata of lora.safetensors (tuples come back as lists)
    import dataclasses
    assert LoRAConfig(**json.loads(json.dumps(dataclasses.asdict(lora)))) == lora


def test_rank_pattern_exports_to_peft_and_matches_it(tmp_path):
    """Per-layer ranks and a head of its own rank: PEFT's rank_pattern (and alpha_pattern where the scale
    needs it) reproduce our logits in peft (1e-4, as test_lora), and the adapter imports back."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers
    from _hf_helpers import make_hf_model, tokens, our_logits, randomize_lora
    from jaxlora.checkpoints.peft import read_peft_adapter

    make_hf_model("llama", seed=3).save_pretrained(tmp_path / "base", safe_serialization=True)
    lora = LoRAConfig(r=4, alpha=8, target_pattern=r".*(attn\.[qv]|mlp\.proj)", rank_pattern=(("attn.v", 2), ("proj", 6)))
    model = randomize_lora(jaxlora.load_model(tmp_path / "base", lora=lora))
    jaxlora.save_peft_adapter(model, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["rank_pattern"] == {"v_proj": 2, "down_proj": 6}
    assert sorted(written["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    reference = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = reference(torch.tensor(tokens())).logits.numpy()
    np.testing.assert_allclose(our_logits(model), expected, atol=1e-4)
    lora_back, params = read_peft_adapter(tmp_path / "adapter", model.config)
    assert lora_back == lora
    ours = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ours)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_lora_plus_scales_the_updates_of_b_only():
    """One SGD step with lora_plus_ratio=4: B (and a DoRA magnitude) moves 4x as far as without, A the same."""
    params = {"q": {"adapter": {"lora_a": jnp.ones((3, 2)), "lora_b": jnp.ones((2, 3)), "magnitude": jnp.ones(3)}}}
    grads = jax.tree.map(lambda x: 0.5 * jnp.ones_like(x), params)
    moved = {}
    for ratio in (None, 4.0):
        tx, _ = make_optimizer("sgd", lr=0.1, total_steps=10, lora_plus_ratio=ratio)
        state = init_train_state(params, tx)
        updates, _ = tx.update(grads, state.opt_state, state.lora)
        moved[ratio] = updates["q"]["adapter"]
    np.testing.assert_allclose(moved[4.0]["lora_a"], moved[None]["lora_a"])
    for name in ("lora_b", "magnitude"):
        assert float(jnp.abs(moved[None][name]).max()) > 0
        np.testing.assert_allclose(moved[4.0][name], 4.0 * moved[None][name])
