"""LoRA: parity with HF `peft`, merge, parameter counts, B = 0, dropout only in training.

Reference: `peft.get_peft_model` on the same HF checkpoint with the same random non-zero A/B.
Tolerance 1e-4 absolute on fp32 logits, as in test_hf_parity (observed differences ~1e-6).
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jaxlora  # noqa: E402
from jaxlora.errors import ConfigError  # noqa: E402

ATOL = 1e-4
VOCAB = 96
ALL_TARGETS = dict(query=True, key=True, value=True, projection=True, mlp=True, head=True)

# Our layer path -> the HF module name (under model.layers.{i}) for the families compared with peft.
LLAMA_MODULES = {("attn", "q"): "self_attn.q_proj", ("attn", "k"): "self_attn.k_proj",
                 ("attn", "v"): "self_attn.v_proj", ("attn", "proj"): "self_attn.o_proj",
                 ("mlp", "fc_1"): "mlp.gate_proj", ("mlp", "fc_2"): "mlp.up_proj", ("mlp", "proj"): "mlp.down_proj"}
PHI_MODULES = {("attn", "q"): "self_attn.q_proj", ("attn", "k"): "self_attn.k_proj",
               ("attn", "v"): "self_attn.v_proj", ("attn", "proj"): "self_attn.dense",
               ("mlp", "fc"): "mlp.fc1", ("mlp", "proj"): "mlp.fc2"}
CASES = {
    "llama": ("LlamaConfig", dict(intermediate_size=96, num_key_value_heads=2), LLAMA_MODULES),
    "phi": ("PhiConfig", dict(intermediate_size=96, partial_rotary_factor=0.5), PHI_MODULES),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, (cls, kwargs, _) in CASES.items():
        config = getattr(transformers, cls)(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, attn_implementation="eager", **kwargs)
        torch.manual_seed(1)
        path = tmp_path_factory.mktemp(name)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
        out[name] = path
    return out


def _ids(batch=2, seq=10):
    return np.random.RandomState(3).randint(0, VOCAB, (batch, seq))


def _peft_model(path, modules, r, alpha, rslora):
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    targets = sorted({m.split(".")[-1] for m in modules.values()} | {"lm_head"})
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, use_rslora=rslora)
    model = peft.get_peft_model(base, cfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _copy_adapters(model, peft_model, modules):
    """Set our lora_a [layers, in, r] / lora_b [layers, r, out] from peft's A [r, in] / B [out, r]."""
    sd = {k: v.detach().numpy() for k, v in peft_model.state_dict().items() if "lora_" in k}
    n_layer = model.config.n_layer
    for (group, layer_name), hf_name in modules.items():
        layer = getattr(getattr(model.blocks, group), layer_name)
        pre = "base_model.model.model.layers.{i}." + hf_name
        layer.adapter.lora_a[...] = jnp.stack([sd[pre.format(i=i) + ".lora_A.default.weight"].T for i in range(n_layer)])
        layer.adapter.lora_b[...] = jnp.stack([sd[pre.format(i=i) + ".lora_B.default.weight"].T for i in range(n_layer)])
    model.lm_head.adapter.lora_a[...] = jnp.asarray(sd["base_model.model.lm_head.lora_A.default.weight"].T)
    model.lm_head.adapter.lora_b[...] = jnp.asarray(sd["base_model.model.lm_head.lora_B.default.weight"].T)


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("name,r,alpha,rslora", [("llama", 4, 8.0, False), ("llama", 4, 8.0, True),
                                                 ("phi", 8, 16.0, False)])
def test_adapters_and_merge_match_peft(checkpoints, name, r, alpha, rslora):
    _, _, modules = CASES[name]
    path = checkpoints[name]
    reference = _peft_model(path, modules, r, alpha, rslora)
    model = jaxlora.load_model(path, lora=jaxlora.LoRAConfig(r=r, alpha=alpha, use_rslora=rslora, **ALL_TARGETS))
    _copy_adapters(model, reference, modules)
    ids = _ids()
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))[..., :VOCAB]
    np.testing.assert_allclose(ours, _torch_logits(reference, ids), atol=ATOL, rtol=0)

    merged_ref = _torch_logits(reference.merge_and_unload(), ids)
    merged = jaxlora.merge_lora(model)
    assert jaxlora.count_lora_params(merged) == 0
    np.testing.assert_allclose(np.asarray(merged(jnp.asarray(ids, jnp.int32)))[..., :VOCAB], merged_ref,
                               atol=ATOL, rtol=0)


def _expected_lora_count(c, r, targets) -> int:
    """The LoRA parameter count by formula: r * (in + out) per adapted matrix."""
    q_out, kv_out = c.n_head * c.head_size, c.n_query_groups * c.head_size
    per_layer = 0
    if targets.get("query"):
        per_layer += r * (c.n_embd + q_out)
    if targets.get("key"):
        per_layer += r * (c.n_embd + kv_out)
    if targets.get("value"):
        per_layer += r * (c.n_embd + kv_out)
    if targets.get("projection"):
        per_layer += r * (q_out + c.n_embd)
    if targets.get("mlp"):
        matrices = 2 if c.mlp_class == "GptNeoxMLP" else 3
        per_layer += matrices * r * (c.n_embd + c.intermediate_size) * max(c.n_expert, 1)
    head = r * (c.n_embd + c.padded_vocab_size) if targets.get("head") else 0
    return c.n_layer * per_layer + head


@pytest.mark.parametrize("preset", ["Mixtral-8x7B-v0.1", "pythia-14m", "gemma-2-2b", "Qwen2.5-0.5B"])
@pytest.mark.parametrize("targets", [dict(query=True, value=True), ALL_TARGETS])
def test_lora_param_count_matches_formula(preset, targets):
    # Shrink the preset (widths, depth) but keep its structure (GQA ratio, MLP class, experts).
    c = jaxlora.ModelConfig.from_name(preset)
    c = c.replace(n_layer=2, n_embd=c.n_head * 8, head_size=8, intermediate_size=40, padded_vocab_size=64,
                  vocab_size=64)
    r = 4
    model = nnx.eval_shape(lambda: jaxlora.GPT(c, jaxlora.LoRAConfig(r=r, **targets), rngs=nnx.Rngs(0)))
    _, lora_params, base_params = jaxlora.split_lora(model)
    assert sum(x.size for x in jax.tree.leaves(lora_params)) == _expected_lora_count(c, r, targets)
    variables = jax.tree.leaves(base_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert variables and not any(isinstance(v, nnx.LoRAParam) for v in variables)


def test_zero_b_equals_base_and_dropout_only_in_training(checkpoints):
    path = checkpoints["llama"]
    ids = jnp.asarray(_ids(), jnp.int32)
    base = np.asarray(jaxlora.load_model(path)(ids))
    model = jaxlora.load_model(path, lora=jaxlora.LoRAConfig(r=4, dropout=0.5, **ALL_TARGETS))
    np.testing.assert_allclose(np.asarray(model(ids)), base, atol=1e-6, rtol=0)

    model.blocks.attn.q.adapter.lora_b[...] = 0.1 * jnp.ones_like(model.blocks.attn.q.adapter.lora_b[...])
    eval_a, eval_b = np.asarray(model(ids)), np.asarray(model(ids))
    np.testing.assert_array_equal(eval_a, eval_b)  # no dropout key: deterministic
    train = np.asarray(model(ids, dropout_key=jax.random.key(0)))
    assert np.abs(train - eval_a).max() > 1e-3  # dropout acts on the LoRA branch in training
    # With B back at zero, dropout cannot change anything: it acts only on the LoRA branch.
    model.blocks.attn.q.adapter.lora_b[...] = jnp.zeros_like(model.blocks.attn.q.adapter.lora_b[...])
    np.testing.assert_allclose(np.asarray(model(ids, dropout_key=jax.random.key(0))), base, atol=1e-6, rtol=0)


def test_expert_adapters_merge_exactly():
    """Mixtral: LoRA on every expert matrix; merged weights give the adapted model's logits."""
    c = jaxlora.ModelConfig.from_name("Mixtral-8x7B-v0.1").replace(
        n_layer=2, n_embd=32, n_head=4, n_query_groups=2, head_size=8, intermediate_size=24, n_expert=4,
        vocab_size=64, padded_vocab_size=64)
    model = jaxlora.GPT(c, jaxlora.LoRAConfig(r=2, mlp=True), rngs=nnx.Rngs(0))
    for layer in (model.blocks.mlp.fc_1, model.blocks.mlp.fc_2, model.blocks.mlp.proj):
        assert layer.adapter.lora_a[...].shape[:2] == (2, 4)  # [layers, experts, in, r]
        layer.adapter.lora_b[...] = 0.2 * jax.random.normal(jax.random.key(1), layer.adapter.lora_b[...].shape)
    ids = jnp.asarray(_ids(seq=6) % 64, jnp.int32)
    adapted = np.asarray(model(ids))
    assert np.abs(adapted - np.asarray(jaxlora.GPT(c, rngs=nnx.Rngs(0))(ids))).max() > 1e-3
    np.testing.assert_allclose(np.asarray(jaxlora.merge_lora(model)(ids)), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs,match", [(dict(r=-1), "lora_r must be >= 0"), (dict(r=4, alpha=0), "lora_alpha"),
                                          (dict(r=4, dropout=1.0), "lora_dropout")])
def test_bad_lora_settings_are_one_sentence(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        jaxlora.LoRAConfig(**kwargs)


def test_tied_head_adapter_merges_into_an_untied_head():
    c = jaxlora.ModelConfig.from_name("Qwen2.5-0.5B").replace(n_layer=1, n_embd=28, head_size=2, intermediate_size=8,
                                                               vocab_size=32, padded_vocab_size=32)
    model = jaxlora.GPT(c, jaxlora.LoRAConfig(r=2, head=True, query=True), rngs=nnx.Rngs(0))
    model.lm_head.adapter.lora_b[...] = 0.3 * jnp.ones_like(model.lm_head.adapter.lora_b[...])
    ids = jnp.asarray(np.arange(12).reshape(2, 6) % 32, jnp.int32)
    merged = jaxlora.merge_lora(model)
    assert model.config.tie_embeddings and model.lm_head.kernel is None  # the original is untouched
    assert not merged.config.tie_embeddings and merged.lm_head.kernel is not None
    np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(model(ids)), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(merged.wte[...]), np.asarray(model.wte[...]))


@pytest.mark.parametrize("transposed", [False, True])
def test_matmul_gradients_equal_autodiff_of_a_plain_dot(transposed):
    """`matmul`'s hand-written backward pass (fp32 here) gives the gradients autodiff gives a plain dot.

    Tolerance 1e-5 relative: the same products summed in possibly different orders (fp32, sums of 24 terms)."""
    from jaxlora.models.linear import matmul

    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (6, 24))
    w = jax.random.normal(kw, (10, 24) if transposed else (24, 10))
    g = jax.random.normal(kg, (6, 10))
    plain = (lambda x, w: x @ w.T) if transposed else (lambda x, w: x @ w)
    ours = jax.grad(lambda x, w: jnp.sum(matmul(x, w, transposed, jnp.dtype(jnp.float32)) * g), argnums=(0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(plain(x, w) * g), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_matmul_multiplies_in_bf16_forward_and_backward():
    """In bf16, no product of `matmul` (forward or backward) upcasts its operands to fp32: every dot
    of the compiled gradient takes bf16 operands (the fast bf16 x bf16 -> fp32 path of XLA's CPU backend)."""
    from jaxlora.models.linear import matmul

    x = jnp.ones((8, 16), jnp.bfloat16)
    w = jnp.ones((16, 4), jnp.bfloat16)
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(matmul(x, w, False, jnp.dtype(jnp.bfloat16)).astype(jnp.float32)),
                            argnums=(0, 1)))
    text = grad.lower(x, w).as_text()
    dots = [line.split(":")[-1] for line in text.splitlines() if "dot_general" in line]
    assert len(dots) >= 2  # dx and dw (and the forward product unless it is dropped as dead)
    assert all(re.fullmatch(r"\s*\(tensor<\S+xbf16>, tensor<\S+xbf16>\) -> tensor<\S+xf32>", d) for d in dots), dots
