"""Sharding over a (data, fsdp, tensor) mesh of 8 forced CPU devices: the same training as 1 device,
weights placed by the rules (also straight from an HF checkpoint), frozen weights gathered one layer
at a time, and bad mesh configs as one-sentence errors. The 8-device part runs in a subprocess,
because the device count is fixed when jax initialises."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from _multidevice_helpers import subprocess_env

from jaxlora.errors import ConfigError
from jaxlora.training.sharding import mesh_shape

SCRIPT = textwrap.dedent("""
    import contextlib, io, re, sys, tempfile
    from pathlib import Path
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from _multidevice_helpers import write_tiny_llama
    from _train_helpers import FixedBatches, random_batch, tiny_split
    from jaxlora import cli, load_model
    from jaxlora.training import sharding as sh
    from jaxlora.training.loop import FitSettings, fit
    from jaxlora.training.optim import make_optimizer
    from jaxlora.training.step import init_train_state, make_eval_step, make_train_step

    assert jax.device_count() == 8, jax.devices()
    tmp = Path(tempfile.mkdtemp())

    # 1. Two optimizer steps (2 micro-batches each, LoRA dropout 0.1) on each mesh vs one device.
    graphdef, lora, base = tiny_split(dropout=0.1)
    lora_meta = tiny_split(0.0)[1]  # the same tree, as an nnx.State with the logical axes
    tx, _ = make_optimizer("sgd", lr=0.5, momentum=0.9, total_steps=4, max_norm=10.0)
    rng = np.random.default_rng(0)
    batches = [random_batch(rng, (2, 8, 16), pad_from=p) for p in (16, 11)]  # [accum, global micro, seq]
    val = [random_batch(rng, (8, 16))]
    stacked = {tuple(x.shape) for x in jax.tree.leaves(base["blocks"])}  # whole [n_layer, ...] frozen weights

    def run(shape, devices):
        mesh = sh.make_mesh(shape, devices)
        base_sharded = sh.shard_params(base, mesh)
        state = init_train_state(lora, tx)
        state_sharding = sh.train_state_shardings(state, sh.param_shardings(lora_meta, mesh), tx)
        state = jax.device_put(state, state_sharding)
        step = make_train_step(graphdef, tx, accum_steps=2, chunk_size=8, state_sharding=state_sharding)
        key = sh.replicate(jax.random.key(3), mesh)
        batch = {k: sh.global_batch_from_local(v, mesh) for k, v in batches[0].items()}
        hlo = step.lower(state, base_sharded, batch, key).compile().as_text()
        gathered = {tuple(int(n) for n in s.split(",") if n)
                    for s in re.findall(r"= \\w+\\[([\\d,]*)\\][^=]*? all-gather(?:-start)?\\(", hlo)}
        assert not gathered & stacked, f"{shape}: a whole stacked frozen weight is gathered: {gathered & stacked}"
        with tempfile.TemporaryDirectory() as out:
            evaluate = make_eval_step(graphdef, chunk_size=8, mesh=mesh)
            result = fit(state, base_sharded, train_step=step, eval_step=evaluate, train_batches=FixedBatches(batches),
                         key=key, mesh=mesh,
                         settings=FitSettings(max_steps=2, progress_bar=False), out_dir=out, val_batches=val)
        assert step._cache_size() == 1
        placed = jax.tree.map(lambda x: x.sharding, result.state)
        for got, want in zip(jax.tree.leaves(placed), jax.tree.leaves(state_sharding)):
            assert got.spec == want.spec and got.mesh == want.mesh, (shape, got, want)
        return jax.device_get(result.state), result.val_loss, base_sharded

    one, val_one, _ = run((1, 1, 1), jax.devices()[:1])
    for shape in ((8, 1, 1), (1, 8, 1), (2, 2, 2)):
        got, val_got, base_sharded = run(shape, jax.devices())
        worst = 0.0
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(got)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            worst = max(worst, float(np.max(np.abs(np.asarray(a, np.float64) - b))))
        np.testing.assert_allclose(val_one, val_got, rtol=1e-5)
        print("mesh", shape, "max abs diff", worst)
    q = base_sharded["blocks"]["attn"]["q"]["kernel"][...]  # [layers, embed, heads] on the (2, 2, 2) mesh
    assert q.sharding.spec == P(None, "fsdp", "tensor") and q.addressable_shards[0].data.shape == (2, 16, 16)
    # MultiSteps' accumulated gradients are sharded like their params too.
    tx_ms, _ = make_optimizer("adamw", lr=1e-3, total_steps=4, multisteps=2)
    mesh = sh.make_mesh((1, 8, 1))
    lora_sharding = sh.param_shardings(lora_meta, mesh)
    ms = sh.train_state_shardings(init_train_state(lora, tx_ms), lora_sharding, tx_ms)
    assert jax.tree.map(lambda s: s.spec, ms.opt_state.acc_grads) == jax.tree.map(lambda s: s.spec, lora_sharding)
    assert ms.opt_state.mini_step.spec == P()

    # 2. load_model places each frozen weight by the rules as it reads it.
    ckpt = write_tiny_llama(tmp / "ckpt")
    mesh = sh.make_mesh((2, 2, 2))
    plain = nnx.to_pure_dict(nnx.state(load_model(ckpt), nnx.Param))
    placed = nnx.state(load_model(ckpt, mesh=mesh), nnx.Param)
    want = sh.param_shardings(placed, mesh)
    for a, b, s in zip(jax.tree.leaves(plain), jax.tree.leaves(nnx.to_pure_dict(placed)), jax.tree.leaves(want)):
        assert b.sharding == s, (b.sharding, s)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wte = nnx.to_pure_dict(placed)["wte"]  # [vocab 400, embed 32] -> tensor x fsdp
    assert wte.addressable_shards[0].data.shape == (200, 16)

    # 3. Bad meshes through the CLI: one line on stderr, exit code 2.
    def cli_error(*args):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                cli.main(["finetune", f"--config.checkpoint_dir={ckpt}", f"--config.out_dir={tmp / 'out'}", *args])
            except SystemExit as e:
                assert e.code == 2, e.code
            else:
                raise AssertionError(f"no error for {args}")
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    print(cli_error("--config.mesh.data=3"))
    print(cli_error("--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.train.global_batch_size=12"))
    print("ok")
""")


def test_meshes_match_one_device_and_place_weights_by_the_rules():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=subprocess_env(8), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # f32 sums over up to 8 shards in another order: expect ~1e-7, allow rtol 1e-5 / atol 1e-6.
    assert proc.stdout.count("max abs diff") == 3, proc.stdout
    assert ("error: mesh.data=3 x mesh.fsdp=1 x mesh.tensor=1 = 3 devices, but there are 8; make the product 8 "
            "or set one axis to -1") in proc.stdout
    assert "error: train.global_batch_size=12 is not a multiple of data-parallel size 8 x" in proc.stdout
    assert proc.stdout.rstrip().endswith("ok")


@pytest.mark.parametrize("sizes, devices, message", [
    ((2, 2, 1), 8, "mesh.data=2 x mesh.fsdp=2 x mesh.tensor=1 = 4 devices, but there are 8; make the product 8 "
                   "or set one axis to -1"),
    ((-1, 3, 1), 8, "mesh.data=-1 x mesh.fsdp=3 x mesh.tensor=1: the 8 devices cannot be split into the fixed "
                    "axes' 3; choose sizes whose product divides 8"),
])
def test_bad_mesh_shape_is_one_sentence(sizes, devices, message):
    with pytest.raises(ConfigError) as e:
        mesh_shape(*sizes, devices)
    assert str(e.value) == message


def test_mesh_shape_fills_the_remaining_devices():
    assert mesh_shape(-1, 1, 1, 8) == (8, 1, 1, 1)
    assert mesh_shape(2, -1, 2, 8) == (2, 2, 2, 1)
    assert mesh_shape(1, 8, 1, 8) == (1, 8, 1, 1)
    assert mesh_shape(-1, 1, 1, 8, expert=4) == (2, 1, 1, 4)
    with pytest.raises(ConfigError, match=r"^mesh.data=1 x mesh.fsdp=1 x mesh.tensor=1 x mesh.expert=4 = 4 devices"):
        mesh_shape(1, 1, 1, 8, expert=4)
