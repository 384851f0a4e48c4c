"""LoRA on mixture-of-experts experts in PEFT's format (`target_parameters`), both ways, and `jaxlora merge` of it,
against transformers 5 + peft on tiny random Mixtral and Qwen3-MoE models (fp32, CPU).

Every LoRA A and B is random and non-zero, so a misplaced expert, rank block or half of gate_up_proj, a
transposition or a wrong scale shows. Our logits and transformers' agree to 1e-4: both are fp32 but sum in
different orders (our dense dispatch runs every expert and weights the unchosen ones 0, PEFT folds B A * scale into
each expert's weight with one baddbmm, transformers adds the chosen experts one by one), so they differ by a few
ulps of the ~1-sized logits, as in test_hf_parity; a wrong mapping is off by far more than 1e-4 (the adapters are
0.1-sized). jaxlora -> PEFT -> jaxlora gives back the same arrays exactly (pure copies).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from _hf_helpers import hf_logits, make_hf_model, our_logits, randomize_lora, save_base, tokens  # noqa: E402
from flax import nnx  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import jaxlora  # noqa: E402
from jaxlora.checkpoints.adapters import load_with_adapter, read_adapter  # noqa: E402
from jaxlora.checkpoints.peft import save_peft_adapter  # noqa: E402
from jaxlora.cli import main  # noqa: E402
from jaxlora.errors import CheckpointError  # noqa: E402

ATOL = 1e-4
GATE_UP, DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"
# case -> (family, LoRA settings, expected target_parameters, rank_pattern, alpha_pattern)
CASES = {
    # attention modules and all three expert matrices: gate/up fused at rank 2r, alpha 2 alpha
    "mixtral": ("mixtral", jaxlora.LoRAConfig(r=2, alpha=4, query=True, value=True, mlp=True),
                [GATE_UP, DOWN], {GATE_UP: 4}, {GATE_UP: 8.0}),
    # experts only (target_modules []), rsLoRA (alpha sqrt(2)), dropout (PEFT's ParamWrapper refuses it: written 0)
    "qwen3_moe": ("qwen3_moe", jaxlora.LoRAConfig(r=2, alpha=3, dropout=0.05, use_rslora=True, mlp=True),
                  [GATE_UP, DOWN], {GATE_UP: 4}, {GATE_UP: 3 * 2 ** 0.5}),
    # the up half alone (gate rows of B zero) and one parameter per module (no nesting), rank 3 everywhere
    "mixtral-up-only": ("mixtral", jaxlora.LoRAConfig(r=3, alpha=6, target_pattern=r"blocks\.mlp\.fc_2"),
                        [GATE_UP], {}, {}),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family -> base checkpoint dir (with fake tokenizer files)."""
    out = {}
    for name in ("mixtral", "qwen3_moe"):
        out[name] = save_base(name, tmp_path_factory.mktemp(name))
    return out


@pytest.fixture(scope="module")
def adapted(bases):
    """case -> (jaxlora model with random adapters, its logits on `tokens()`)."""
    out = {}
    for case, (family, lora, *_) in CASES.items():
        model = randomize_lora(jaxlora.load_model(bases[family], lora=lora))
        out[case] = (model, our_logits(model))
    return out


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _peft(base, adapter):
    with warnings.catch_warnings():  # PEFT checks rank/alpha_pattern keys against modules only, not parameters
        warnings.filterwarnings("ignore", "The following (rank|alpha)_pattern keys did not match")
        return peft.PeftModel.from_pretrained(_hf(base), adapter).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_expert_adapter_matches_peft_and_round_trips(bases, adapted, case, tmp_path):
    family, lora, targets, ranks, alphas = CASES[case]
    model, ours = adapted[case]
    out = save_peft_adapter(model, tmp_path / "peft", base_model_name_or_path=str(bases[family]))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] == targets and config["lora_dropout"] == 0.0
    assert config["rank_pattern"] == ranks and config["alpha_pattern"] == pytest.approx(alphas)
    assert config["target_modules"] == (["q_proj", "v_proj"] if lora.query else [])

    peft_model = _peft(bases[family], out)
    np.testing.assert_allclose(hf_logits(peft_model, tokens()), ours, atol=ATOL, rtol=0)
    # PEFT saves what it loaded under the same keys, unchanged: our keys and layout are PEFT's own
    peft_model.save_pretrained(tmp_path / "resaved")
    mine, theirs = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "resaved" /
                                                                           "adapter_model.safetensors")
    assert sorted(mine) == sorted(theirs)
    for key, value in mine.items():
        np.testing.assert_array_equal(theirs[key], value, err_msg=key)

    lora_back, params = read_adapter(bases[family], out)
    assert lora_back == model.lora
    expected = flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)), sep=".")
    got = flatten_dict(params, sep=".")
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], np.asarray(value), err_msg=key)


def test_peft_keys_of_nested_expert_parameters(adapted, tmp_path):
    """Both fused parameters of one experts module: PEFT nests gate_up_proj's wrapper inside down_proj's."""
    out = save_peft_adapter(adapted["mixtral"][0], tmp_path / "peft")
    shapes = {k: v.shape for k, v in load_file(out / "adapter_model.safetensors").items() if ".layers.1.mlp" in k}
    e, d, f, r = 4, 32, 24, 2  # experts, width, expert width, rank
    prefix = "base_model.model.model.layers.1.mlp.experts."
    assert shapes == {prefix + "base_layer.lora_A.weight": (e * 2 * r, d),  # gate_up_proj: [E*2r, d], [2f, 2r*E]
                      prefix + "base_layer.lora_B.weight": (2 * f, 2 * r * e),
                      prefix + "lora_A.weight": (e * r, f), prefix + "lora_B.weight": (d, r * e)}  # down_proj


def test_peft_trained_expert_adapter_loads(bases, tmp_path):
    """An adapter trained in PEFT on both expert parameters (dense per-expert A and B of rank r) and the attention
    loads into rank-r gate / up / down adapters (gate and up share A) and gives PEFT's logits."""
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["k_proj"], target_parameters=[GATE_UP, DOWN],
                             init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(_hf(bases["qwen3_moe"]), config).eval()
    peft_model.save_pretrained(tmp_path / "a")
    model = load_with_adapter(bases["qwen3_moe"], tmp_path / "a")
    assert (model.lora.r, model.lora.alpha, model.lora.key, model.lora.mlp) == (3, 5, True, True)
    np.testing.assert_allclose(our_logits(model), hf_logits(peft_model, tokens()), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe"])
def test_merge_cli_of_expert_adapter(bases, adapted, case, tmp_path):
    """`jaxlora merge` of the exported PEFT adapter writes per-expert HF tensors that transformers 5 loads into its
    fused experts; its logits are our merged model's and the adapted model's."""
    family = CASES[case][0]
    model, ours = adapted[case]
    merged_ours = our_logits(jaxlora.merge_lora(model))
    np.testing.assert_allclose(merged_ours, ours, atol=ATOL, rtol=0)
    save_peft_adapter(model, tmp_path / "peft")
    assert main(["merge", "--checkpoint_dir", str(bases[family]), "--adapter", str(tmp_path / "peft"),
                 "--out", str(tmp_path / "merged")]) == 0
    hf = _hf(tmp_path / "merged")
    base_hf = _hf(bases[family])
    changed = [n for n, p in hf.named_parameters() if "experts" in n
               and not torch.equal(p, dict(base_hf.named_parameters())[n])]
    assert len(changed) == 2 * model.config.n_layer  # gate_up_proj and down_proj of every layer were merged
    np.testing.assert_allclose(hf_logits(hf, tokens()), merged_ours, atol=ATOL, rtol=0)


def test_dora_on_experts_is_refused(tmp_path):
    config = jaxlora.ModelConfig.from_hf_config(make_hf_model("mixtral").config.to_dict())
    lora = jaxlora.LoRAConfig(r=2, mlp=True, use_dora=True)
    model = nnx.eval_shape(lambda: jaxlora.GPT(config, lora, rngs=nnx.Rngs(0)))
    with pytest.raises(CheckpointError, match="^DoRA on the experts of a mixture-of-experts model cannot be expressed "
                                              "in PEFT's format"):
        save_peft_adapter(model, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_expert_adapters_of_unknown_parameters_are_refused(bases, adapted, tmp_path):
    out = save_peft_adapter(adapted["mixtral"][0], tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(dict(config, target_parameters=[GATE_UP, "mlp.gate.weight"])))
    with pytest.raises(CheckpointError, match="targets the parameter mlp.gate.weight, which jaxlora cannot adapt"):
        read_adapter(bases["mixtral"], out)
