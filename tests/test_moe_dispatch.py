"""Sparse expert dispatch (`models.grouped`, `gpt.MLP._moe_sparse`) against dense dispatch and transformers.

Tolerances (fp32 on CPU): sparse vs dense 1e-5 on logits and relative 1e-5 on LoRA gradients (the same
products, summed in another order: observed ~1e-7); vs transformers 1e-4 as test_hf_parity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora.models.grouped import ExpertGroups, sparse_pays, tile_rows
from jaxlora.models.lora import LoRAConfig

from _hf_helpers import VOCAB, hf_logits, randomize_lora, tokens

MOE = ("mixtral", "qwen3_moe", "qwen3_moe-norm-topk")


@pytest.mark.parametrize("native", [False, True], ids=["tiles", "ragged_dot"])
@pytest.mark.parametrize("case", ["spread", "empty-experts", "one-expert"])
def test_grouped_matmul_is_each_row_times_its_experts_kernel(native, case):
    rng = np.random.default_rng(0)
    m, n_expert, d_in, d_out = 37, 5, 6, 7
    assign = {"spread": rng.integers(0, n_expert, m),
              "empty-experts": rng.choice([1, 3], m),  # experts 0, 2, 4 get no row
              "one-expert": np.full(m, 4)}[case]
    x = rng.standard_normal((m, d_in)).astype(np.float32)
    w = rng.standard_normal((n_expert, d_in, d_out)).astype(np.float32)
    bias = rng.standard_normal((n_expert, d_out)).astype(np.float32)

    @jax.jit
    def run(assign, x, w, bias):
        groups, order = ExpertGroups.sort(assign, n_expert, native=native)
        return order, groups.matmul(x[order], w, jnp.float32), groups.per_row(bias), groups.sizes

    order, out, row_bias, sizes = jax.device_get(run(jnp.asarray(assign), x, w, bias))
    assert np.all(np.diff(assign[order]) >= 0) and sorted(order) == list(range(m))  # a stable sort by expert
    np.testing.assert_array_equal(sizes, np.bincount(assign, minlength=n_expert))
    want = np.einsum("mi,mio->mo", x[order], w[assign[order]])
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(row_bias, bias[assign[order]])


def test_tiles_and_the_auto_rule():
    assert tile_rows(16, 4) == 8 and tile_rows(4096, 8) == 128 and tile_rows(300, 8) == 64
    assert not sparse_pays(1024, 2, 2)  # nothing to skip
    if jax.default_backend() == "cpu":  # GPU/TPU: sparse whenever n_expert > top_k
        assert not sparse_pays(1, 8, 2) and not sparse_pays(16, 8, 2)  # too few rows (decoding, short batches)
        assert sparse_pays(64, 8, 2)  # measured 1.7x faster (benchmarks/RESULTS.md)
        assert sparse_pays(4096, 8, 2) and sparse_pays(4096, 128, 8)  # Mixtral's and Qwen3-30B-A3B's routing


@pytest.fixture(scope="module")
def moe_checkpoints(hf_checkpoints):
    return {name: hf_checkpoints[name] for name in MOE}


def _pair(path, lora: LoRAConfig, **kwargs):
    """The same checkpoint and (randomised, non-zero) adapters, dense and sparse."""
    return [randomize_lora(jaxlora.load_model(path, lora=lora, moe_dispatch=d, **kwargs), seed=3)
            for d in ("dense", "sparse")]


@pytest.mark.parametrize("name", MOE)
def test_sparse_logits_equal_dense_and_transformers(moe_checkpoints, name):
    path, hf_model = moe_checkpoints[name]
    ids = jnp.asarray(tokens(), jnp.int32)
    base = jaxlora.load_model(path, moe_dispatch="sparse")
    np.testing.assert_allclose(np.asarray(base(ids))[..., :VOCAB], hf_logits(hf_model, tokens()), atol=1e-4, rtol=0)
    dense, sparse = _pair(path, LoRAConfig(r=4, alpha=8, query=True, value=True, mlp=True))
    np.testing.assert_allclose(np.asarray(sparse(ids)), np.asarray(dense(ids)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["lora", "dora", "nf4", "dropout"])
def test_sparse_lora_gradients_equal_dense(moe_checkpoints, variant):
    """Gradients of every LoRA param (experts' A and B included) of a sequence loss, dense vs sparse dispatch;
    with DoRA magnitudes on the experts, on an NF4 base (both dequantise the same codes), and with LoRA dropout
    (both draw other masks: only the loss's finiteness and the gradients' structure can be compared)."""
    from jaxlora.training.step import sequence_loss

    path, _ = moe_checkpoints["mixtral"]
    lora = LoRAConfig(r=4, alpha=8, query=True, mlp=True, use_dora=variant == "dora",
                      dropout=0.1 if variant == "dropout" else 0.0)
    models = _pair(path, lora, quantize="nf4" if variant == "nf4" else None)
    ids = jnp.asarray(tokens(seed=1), jnp.int32)
    key = jax.random.key(0) if variant == "dropout" else None

    def grads(model):
        graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)

        def loss(p):
            total, count = sequence_loss(nnx.merge(graphdef, p, rest), ids, ids, dropout_key=key)
            return total / count

        return jax.device_get(jax.jit(jax.value_and_grad(loss))(params))

    (loss_d, g_d), (loss_s, g_s) = grads(models[0]), grads(models[1])
    leaves_d, leaves_s = jax.tree.leaves(g_d), jax.tree.leaves(g_s)
    assert jax.tree.structure(g_d) == jax.tree.structure(g_s)
    if variant == "dropout":
        assert np.isfinite(loss_s) and all(np.all(np.isfinite(g)) for g in leaves_s)
        return
    np.testing.assert_allclose(loss_s, loss_d, rtol=1e-6)
    expert = g_s["blocks"]["mlp"]["fc_1"]["adapter"]["lora_a"]
    assert np.abs(expert).max() > 0  # the experts' adapters do get gradients
    for a, b in zip(leaves_s, leaves_d):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(b).max())), rtol=0)


EXPERT_MESH_SCRIPT = """
import jax, numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
import jaxlora
from jaxlora.models.lora import LoRAConfig
from jaxlora.training import sharding as sh
from jaxlora.training.optim import make_optimizer
from jaxlora.training.step import init_train_state, make_train_step
from _hf_helpers import randomize_lora
import sys

assert jax.device_count() == 8
path, dispatch = sys.argv[1], sys.argv[2]
lora = LoRAConfig(r=4, alpha=8, query=True, mlp=True)
tx, _ = make_optimizer("sgd", lr=0.5, momentum=0.9, total_steps=4, max_norm=10.0)
rng = np.random.default_rng(0)
ids = rng.integers(0, 64, (2, 8, 10)).astype(np.int32)  # [accum, global micro-batch, seq]
batch = {"input_ids": ids, "labels": ids}

def run(shape, devices):
    mesh = sh.make_mesh(shape, devices)
    model = randomize_lora(jaxlora.load_model(path, lora=lora, moe_dispatch=dispatch, mesh=mesh), seed=3)
    graphdef, lora_state, base = nnx.split(model, nnx.LoRAParam, ...)
    lora_sharding = sh.param_shardings(lora_state, mesh)
    state = init_train_state(nnx.to_pure_dict(lora_state), tx)
    state_sharding = sh.train_state_shardings(state, lora_sharding, tx)
    state = jax.device_put(state, state_sharding)
    step = make_train_step(graphdef, tx, accum_steps=2, chunk_size=8, state_sharding=state_sharding)
    global_batch = {k: sh.global_batch_from_local(v, mesh) for k, v in batch.items()}
    key = sh.replicate(jax.random.key(1), mesh)
    for _ in range(2):
        state, metrics = step(state, base, global_batch, key)
    experts = nnx.to_pure_dict(base)["blocks"]["mlp"]["fc_1"]["kernel"]  # [layers, experts, embed, mlp]
    return jax.device_get((state.lora, metrics["loss"])), experts.sharding.spec

(one, loss_one), _ = run((1,), jax.devices()[:1])
(got, loss_got), spec = run((2, 1, 1, 4), jax.devices())  # data 2 x expert 4
assert spec == P(None, "expert", None, None), spec
a = got["blocks"]["mlp"]["fc_1"]["adapter"]["lora_a"]
worst = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(got)))
for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(got)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(loss_one, loss_got, rtol=1e-5)
print("expert mesh max abs diff", worst)
"""


@pytest.mark.slow  # two 8-device subprocesses; CI runs it with `pytest -m slow`
@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_expert_mesh_axis_trains_like_one_device(moe_checkpoints, dispatch):
    """Two optimizer steps on 8 forced CPU devices, mesh data 2 x expert 4 (experts' frozen kernels and adapters
    split over `expert`, the batch over data x expert), equal one device's (f32: sums in another order, ~1e-7)."""
    import subprocess
    import sys

    from _multidevice_helpers import subprocess_env

    path, _ = moe_checkpoints["mixtral"]
    proc = subprocess.run([sys.executable, "-c", EXPERT_MESH_SCRIPT, str(path), dispatch], env=subprocess_env(8),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "expert mesh max abs diff" in proc.stdout


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe-norm-topk"])
def test_router_aux_loss_matches_transformers(moe_checkpoints, name):
    """The load-balancing loss over every layer's routing (padding excluded) and the total training loss
    CE + coef x aux equal transformers' `aux_loss` and `loss` with output_router_logits (f32, 1e-5: the
    same softmax and counts, summed in another order)."""
    import torch

    from jaxlora.training.step import sequence_loss

    path, hf_model = moe_checkpoints[name]
    ids = tokens(seed=2)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # right padding in row 1
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels),
                       output_router_logits=True)
    coef = hf_model.config.router_aux_loss_coef
    for dispatch in ("dense", "sparse"):
        model = jaxlora.load_model(path, moe_dispatch=dispatch)
        total, count, aux = sequence_loss(model, jnp.asarray(ids), jnp.asarray(labels), segment_ids=jnp.asarray(mask),
                                          router_aux=True)
        np.testing.assert_allclose(float(aux), float(ref.aux_loss), rtol=1e-5)
        np.testing.assert_allclose(float(total / count + coef * aux), float(ref.loss), rtol=1e-5)


def test_router_aux_loss_trains_and_is_reported(moe_checkpoints):
    """train.router_aux_loss_coef > 0: the step's gradient includes coef x d(aux) (the update differs from
    coef 0), `router_aux_loss` is reported and `loss` stays the cross-entropy alone; a dense model refuses it."""
    from jaxlora.training.optim import make_optimizer
    from jaxlora.training.step import init_train_state, make_train_step

    path, _ = moe_checkpoints["mixtral"]
    model = randomize_lora(jaxlora.load_model(path, lora=LoRAConfig(r=4, alpha=8, query=True, value=True)), seed=3)
    graphdef, params, base = nnx.split(model, nnx.LoRAParam, ...)
    tx, _ = make_optimizer("sgd", lr=1.0, total_steps=2)
    ids = jnp.asarray(np.stack([tokens(seed=4), tokens(seed=5)]), jnp.int32)  # [accum 2, 2, seq]
    batch = {"input_ids": ids, "labels": ids, "segment_ids": jnp.ones_like(ids)}
    out = {}
    for coef in (0.0, 0.5):
        step = make_train_step(graphdef, tx, accum_steps=2, router_aux_loss_coef=coef)
        out[coef] = jax.device_get(step(init_train_state(params, tx), base, batch, jax.random.key(0)))
    (plain, m0), (with_aux, m1) = out[0.0], out[0.5]
    assert "router_aux_loss" not in m0 and float(m1["router_aux_loss"]) > 0
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(plain.lora), jax.tree.leaves(with_aux.lora)))
    assert diff > 1e-6
