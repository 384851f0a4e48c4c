"""DoRA (weight-decomposed LoRA) against HF `peft`'s `use_dora=True` on tiny random checkpoints.

Reference: peft's model on the same HF checkpoint with the same random A, B and magnitudes (ours
exported with `save_peft_adapter` and loaded by `PeftModel.from_pretrained`). Tolerance 1e-4 on
fp32 logits and LoRA gradients (as test_lora: sums in other orders plus the norms of the adapted
kernels; observed ~1e-6). Phi-3's fused qkv_proj / gate_up_proj checks the fused magnitude layout.
"""

from __future__ import annotations

import os

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
from _hf_helpers import VOCAB, make_hf_model, tokens  # noqa: E402
from jaxlora.checkpoints.peft import read_peft_adapter  # noqa: E402
from jaxlora.models.lora import split_lora  # noqa: E402

ATOL = 1e-4
TARGETS = dict(query=True, key=True, value=True, projection=True, mlp=True, head=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name in ("llama", "phi3"):
        path = tmp_path_factory.mktemp(name)
        make_hf_model(name, seed=2).save_pretrained(path, safe_serialization=True)
        out[name] = path
    return out


def _randomize(model, seed=1):
    """Random A, B (B is zero after init) and magnitudes near the initial column norms."""
    state = nnx.state(model, nnx.LoRAParam)
    rng = np.random.RandomState(seed)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        x = var[...]
        noise = rng.standard_normal(x.shape).astype(np.float32)
        var[...] = x * (1 + 0.2 * noise) if path[-1] == "magnitude" else 0.1 * noise
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def _peft(path, adapter_dir):
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True).eval()


def _our_logits(model, ids):
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids, jnp.int32)))[..., :VOCAB]


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_dora_matches_peft_and_round_trips(checkpoints, tmp_path, name):
    """Starts as the base; logits and LoRA/magnitude gradients match peft's DoRA; the adapter exports
    with use_dora and lora_magnitude_vector, imports back unchanged; merge matches peft's merge."""
    lora = jaxlora.LoRAConfig(r=4, alpha=8, use_dora=True, **TARGETS)
    model = jaxlora.load_model(checkpoints[name], lora=lora)
    ids = tokens()
    base_logits = _our_logits(jaxlora.load_model(checkpoints[name]), ids)
    np.testing.assert_allclose(_our_logits(model, ids), base_logits, atol=1e-5)  # m = ||W||, B = 0
    _randomize(model)
    jaxlora.save_peft_adapter(model, tmp_path / "adapter")
    reference = _peft(checkpoints[name], tmp_path / "adapter")
    assert reference.peft_config["default"].use_dora
    with torch.no_grad():
        ref_logits = reference(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_our_logits(model, ids), ref_logits, atol=ATOL)

    # gradients of the same scalar, ours against torch autograd, mapped through the export
    g = np.random.RandomState(4).standard_normal(ref_logits.shape).astype(np.float32)
    graphdef, params, base = split_lora(model)

    def loss(params):
        logits = nnx.merge(graphdef, params, base)(jnp.asarray(ids, jnp.int32))[..., :VOCAB]
        return jnp.sum(logits * g)

    ours = jax.grad(loss)(params)
    tmp_model = nnx.merge(graphdef, ours, base)
    jaxlora.save_peft_adapter(tmp_model, tmp_path / "grads")  # our gradients laid out as PEFT tensors
    from safetensors.numpy import load_file
    our_grads = load_file(tmp_path / "grads" / "adapter_model.safetensors")
    # a fused module's B is block-structured in our export (zeros outside each part's rank block): those
    # entries are no parameters of ours, so only the blocks are compared
    exported = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    (reference(torch.tensor(ids)).logits * torch.tensor(g)).sum().backward()
    checked = 0
    for pname, p in reference.named_parameters():
        if p.grad is None or "lora_" not in pname:
            continue
        key = pname.replace(".default", "").replace("magnitude_vector.weight", "magnitude_vector")
        ref = np.where(exported[key] != 0, p.grad.numpy(), 0.0)
        np.testing.assert_allclose(our_grads[key], ref, atol=ATOL, rtol=1e-4, err_msg=key)
        checked += 1
    assert checked == len(our_grads)

    lora_back, params_back = read_peft_adapter(tmp_path / "adapter", model.config)
    assert lora_back.use_dora
    for a, b in zip(jax.tree.leaves(params_back), jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))):
        np.testing.assert_array_equal(a, np.asarray(b))

    with torch.no_grad():
        merged_ref = reference.merge_and_unload()(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_our_logits(jaxlora.merge_lora(model), ids), merged_ref, atol=ATOL)


def test_qdora_starts_as_the_quantized_base(checkpoints):
    """DoRA on an NF4 base: the magnitudes are the dequantised weights' column norms, so the model
    starts exactly as the quantized base (1e-5), and it trains (non-zero magnitude gradients)."""
    lora = jaxlora.LoRAConfig(r=4, alpha=8, use_dora=True, query=True, value=True)
    model = jaxlora.load_model(checkpoints["llama"], lora=lora, quantize="bnb.nf4")
    ids = tokens()
    np.testing.assert_allclose(_our_logits(model, ids),
                               _our_logits(jaxlora.load_model(checkpoints["llama"], quantize="bnb.nf4"), ids),
                               atol=1e-5)
    graphdef, params, base = split_lora(_randomize(model))
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, base)(jnp.asarray(ids, jnp.int32))))(params)
    assert float(jnp.abs(grads["blocks"]["attn"]["q"]["adapter"]["magnitude"]).max()) > 0
