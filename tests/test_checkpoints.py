"""Orbax train-state checkpoints: round trip, async save vs donation, broken steps, resume paths, retention."""

from __future__ import annotations

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.checkpoints.orbax import CheckpointManager, resolve_resume
from jaxlora.errors import CheckpointError
from jaxlora.training.optim import make_optimizer
from jaxlora.training.step import TrainState, init_train_state

CONFIG = {"train": {"max_steps": 8}, "precision": "32-true"}


def _state(step: int, scale: float = 1.0) -> TrainState:
    q = {"lora_a": jnp.full((2, 8, 4), scale), "lora_b": jnp.arange(2 * 4 * 6.0).reshape(2, 4, 6) * scale}
    lora = {"blocks": {"attn": {"q": q}}}
    tx, _ = make_optimizer("adamw", lr=1e-3, total_steps=10, max_norm=1.0)
    state = init_train_state(lora, tx)
    return state.replace(step=jnp.asarray(step, jnp.int32))


def _save(mgr: CheckpointManager, step: int, val_loss=None, position=None):
    mgr.save(_state(step, scale=float(step)), rng=jax.random.key(step),
             data_position=position or {"epoch": 0, "index": step, "seed": 3}, val_loss=val_loss, config=CONFIG)


def _assert_state_equal(a: TrainState, b: TrainState):
    assert int(a.step) == int(b.step)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip(tmp_path):
    mgr = CheckpointManager(tmp_path, max_to_keep=3)
    _save(mgr, 2, val_loss=1.5)
    _save(mgr, 4, val_loss=1.25, position={"epoch": 1, "index": 0, "seed": 3})
    assert mgr.save(_state(4), rng=jax.random.key(0), data_position=None, val_loss=None, config=None) is False
    mgr.wait_until_finished()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    restored = CheckpointManager(tmp_path).restore(_state(0))
    assert restored.step == 4 and restored.val_loss == 1.25 and restored.config == CONFIG
    assert restored.data_position == {"epoch": 1, "index": 0, "seed": 3}
    _assert_state_equal(restored.state, _state(4, scale=4.0))
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(jax.random.key(4)))
    older = CheckpointManager(tmp_path).restore(_state(0), step=2)
    _assert_state_equal(older.state, _state(2, scale=2.0))


def test_async_save_survives_donation_of_the_saved_state(tmp_path):
    mgr = CheckpointManager(tmp_path, async_save=True)
    state = _state(1)
    expected = jax.device_get(state)
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    mgr.save(state, rng=jax.random.key(0), data_position=None, val_loss=None, config=None)
    state = bump(state)  # deletes the saved buffers while the write may still be running
    mgr.wait_until_finished()
    _assert_state_equal(CheckpointManager(tmp_path).restore(_state(0)).state, expected)


def _truncate_arrays(step_dir):
    for root, _, files in os.walk(step_dir / "lora"):
        for name in files:
            if "/d/" in os.path.join(root, name):
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(7)


def _garbage(step_dir):
    for root, _, files in os.walk(step_dir / "opt_state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(os.urandom(64))


CORRUPTIONS = {
    "missing commit marker": lambda d: os.remove(d / "commit_success.txt"),
    "truncated array file": _truncate_arrays,
    "garbage files": _garbage,
    "missing item": lambda d: shutil.rmtree(d / "meta"),
    "empty directory": lambda d: [shutil.rmtree(d), d.mkdir()],
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_broken_newest_step_is_skipped_with_a_warning(tmp_path, caplog, corruption):
    mgr = CheckpointManager(tmp_path, async_save=False)
    _save(mgr, 2)
    _save(mgr, 4)
    mgr.close()
    CORRUPTIONS[corruption](tmp_path / "checkpoints" / "4")
    mgr = CheckpointManager(tmp_path, async_save=False)
    with caplog.at_level(logging.WARNING, logger="jaxlora.checkpoints.orbax"):
        restored = mgr.restore(_state(0))
    assert restored.step == 2
    _assert_state_equal(restored.state, _state(2, scale=2.0))
    assert any("skipping checkpoint step 4" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "checkpoints" / "4.corrupt").is_dir()
    _save(mgr, 4)  # the resumed run can write step 4 again
    mgr.wait_until_finished()
    assert mgr.all_steps() == [2, 4]


def test_explicit_broken_step_and_all_broken_are_errors(tmp_path):
    mgr = CheckpointManager(tmp_path, async_save=False)
    _save(mgr, 2)
    _truncate_arrays(tmp_path / "checkpoints" / "2")
    with pytest.raises(CheckpointError, match="step 2 .* cannot be restored"):
        mgr.restore(_state(0), step=2)
    with pytest.raises(CheckpointError, match="no complete checkpoint for step 7"):
        mgr.restore(_state(0), step=7)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        mgr.restore(_state(0))


def test_half_written_step_is_not_a_step(tmp_path):
    """A crash mid-save leaves orbax's temporary directory, which is never taken for a step."""
    mgr = CheckpointManager(tmp_path, async_save=False)
    _save(mgr, 2)
    partial = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(tmp_path / "checkpoints" / "2", partial)
    mgr = CheckpointManager(tmp_path, async_save=False)
    assert mgr.all_steps() == [2]
    assert mgr.restore(_state(0)).step == 2
    assert CheckpointManager(tmp_path / "empty").restore(_state(0)) is None


def test_keep_latest_and_best_by_val_loss(tmp_path):
    mgr = CheckpointManager(tmp_path, max_to_keep=1, keep_best=1, async_save=False)
    for step, val in ((1, 1.0), (2, 0.5), (3, 0.9), (4, 0.8)):
        _save(mgr, step, val_loss=val)
    mgr.wait_until_finished()
    assert mgr.all_steps() == [2, 4]  # the best (0.5) and the newest


def test_resolve_resume(tmp_path):
    assert resolve_resume(False, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_resume(True, tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(tmp_path / "checkpoints" / "12", tmp_path)
    with pytest.raises(CheckpointError, match="neither"):
        resolve_resume(tmp_path / "nowhere", tmp_path)
    _save(CheckpointManager(tmp_path, async_save=False), 3)
    assert resolve_resume(True, tmp_path) == (tmp_path, None)
    assert resolve_resume("auto", tmp_path) == (tmp_path, None)
    assert resolve_resume(str(tmp_path / "checkpoints" / "3"), "elsewhere") == (tmp_path, 3)
    assert resolve_resume(tmp_path / "checkpoints", "elsewhere") == (tmp_path, None)
    assert resolve_resume(tmp_path, "elsewhere") == (tmp_path, None)
