"""Data parallelism: 2 optimizer steps through `fit` on an 8-device CPU mesh equal the same steps on
1 device. Runs in a subprocess, because the device count is fixed when jax initialises."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import sys, tempfile
    import jax, numpy as np
    from _train_helpers import FixedBatches, random_batch, tiny_split
    from jaxlora.training.loop import FitSettings, fit
    from jaxlora.training.optim import make_optimizer
    from jaxlora.training.sharding import make_mesh, replicate
    from jaxlora.training.step import init_train_state, make_eval_step, make_train_step

    assert jax.device_count() == 8, jax.devices()
    graphdef, lora, base = tiny_split(dropout=0.1)
    tx, _ = make_optimizer("sgd", lr=0.5, momentum=0.9, total_steps=4, max_norm=10.0)
    rng = np.random.default_rng(0)
    batches = [random_batch(rng, (2, 8, 16), pad_from=p) for p in (16, 11)]  # [accum, global micro, seq]
    val = [random_batch(rng, (8, 16))]

    def run(devices):
        mesh = make_mesh(devices)
        step = make_train_step(graphdef, tx, accum_steps=2, chunk_size=8)
        evaluate = make_eval_step(graphdef, chunk_size=8)
        state = replicate(init_train_state(lora, tx), mesh)
        with tempfile.TemporaryDirectory() as out:
            result = fit(state, replicate(base, mesh), train_step=step, eval_step=evaluate,
                         train_batches=FixedBatches(batches), key=replicate(jax.random.key(3), mesh), mesh=mesh,
                         settings=FitSettings(max_steps=2, progress_bar=False), out_dir=out, val_batches=val)
        assert step._cache_size() == 1
        leaves = jax.tree.leaves(result.state.lora)
        assert all(len(x.sharding.device_set) == len(devices) for x in leaves)
        return jax.device_get(result.state), result.val_loss

    one, val_one = run(jax.devices()[:1])
    eight, val_eight = run(jax.devices())
    worst = 0.0
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        worst = max(worst, float(np.max(np.abs(a - b))))
    np.testing.assert_allclose(val_one, val_eight, rtol=1e-6)
    print("max abs diff", worst)
""")


def test_eight_device_mesh_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    tests_dir = Path(__file__).parent
    env["PYTHONPATH"] = os.pathsep.join([str(tests_dir), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # f32 sums over 8 shards in another order: expect ~1e-7, allow rtol 1e-5 / atol 1e-6.
    assert "max abs diff" in proc.stdout
