"""The training loop on a tiny random model and synthetic batches: learning, logging, no recompiles,
exact resume, divergence handling, the time limit."""

from __future__ import annotations

import re

import csv
import json

import jax
import numpy as np
import pytest

from _train_helpers import FixedBatches, random_batch, tiny_split
from jaxlora.checkpoints.orbax import CheckpointManager
from jaxlora.errors import ConfigError
from jaxlora.training.loop import DivergenceError, FitSettings, fit
from jaxlora.training.optim import make_optimizer
from jaxlora.training.sharding import make_mesh, replicate
from jaxlora.training.step import init_train_state, make_eval_step, make_train_step

ACCUM, MICRO, SEQ = 2, 2, 16
TOTAL_STEPS = 30


@pytest.fixture(scope="module")
def engine():
    """One model (LoRA dropout 0.1), optimizer and pair of jitted steps shared by every test here."""
    graphdef, lora, base = tiny_split(dropout=0.1)
    mesh = make_mesh()
    tx, schedule = make_optimizer("adamw", lr=2e-2, total_steps=TOTAL_STEPS, warmup_steps=2, weight_decay=0.01,
                                  max_norm=1.0)
    rng = np.random.default_rng(5)
    batches = [random_batch(rng, (ACCUM, MICRO, SEQ), prompt_len=2) for _ in range(3)]
    val = [b["input_ids"][0] for b in batches]
    return dict(graphdef=graphdef, lora=lora, base=replicate(base, mesh), mesh=mesh, tx=tx, schedule=schedule,
                train_step=make_train_step(graphdef, tx, accum_steps=ACCUM, chunk_size=8),
                eval_step=make_eval_step(graphdef, chunk_size=8), batches=batches,
                val=[{"input_ids": v, "labels": b["labels"][0]} for v, b in zip(val, batches)],
                key=replicate(jax.random.key(11), mesh))


def _fresh_state(e):
    return replicate(init_train_state(e["lora"], e["tx"]), e["mesh"])


def _fit(e, state, out_dir, settings, batches=None, checkpoints=None, **kw):
    batches = batches or FixedBatches(e["batches"])
    return fit(state, e["base"], train_step=e["train_step"], eval_step=e["eval_step"], train_batches=batches,
               key=e["key"], mesh=e["mesh"], settings=settings, out_dir=out_dir, schedule=e["schedule"],
               checkpoints=checkpoints, data_position=batches.position, **kw)


def _rows(out_dir):
    with open(out_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_loss_falls_logs_and_compiles_once(engine, tmp_path):
    settings = FitSettings(max_steps=TOTAL_STEPS, log_interval=5, eval_interval=10, eval_max_iters=2,
                           initial_validation=True, final_validation=True, tensorboard=True, progress_bar=False)
    result = _fit(engine, _fresh_state(engine), tmp_path, settings, val_batches=engine["val"],
                  flops_per_token=1e5, peak_flops=1e12)
    rows = _rows(tmp_path)
    assert [int(r["step"]) for r in rows] == [0, 5, 10, 15, 20, 25, 30]  # initial validation, then logs
    train = [r for r in rows if r["loss"]]
    assert float(train[-1]["loss"]) < float(train[0]["loss"]) - 1.0  # memorises 3 fixed batches
    vals = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(vals) == 4 and vals[-1] < vals[0] - 1.0  # steps 0, 10, 20, 30
    assert result.val_loss == pytest.approx(vals[-1])
    np.testing.assert_allclose(float(rows[1]["lr"]), float(engine["schedule"](4)), rtol=1e-6)
    assert int(rows[-1]["tokens"]) == TOTAL_STEPS * ACCUM * MICRO * SEQ
    assert all(float(r["tokens_per_s"]) > 0 for r in train)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == TOTAL_STEPS and summary["peak_memory_bytes"] > 0
    assert 0 < summary["mfu"] == pytest.approx(1e5 * summary["tokens_per_s"] / 1e12)
    assert list((tmp_path / "tensorboard").iterdir())
    assert engine["train_step"]._cache_size() == 1 and engine["eval_step"]._cache_size() == 1


def test_exact_resume_is_bitwise_identical(engine, tmp_path):
    """6 steps in one go vs 3 steps, save, restore (state, dropout key, data position), 3 more."""
    settings = FitSettings(max_steps=6, save_interval=3, final_validation=False, progress_bar=False)
    full = _fit(engine, _fresh_state(engine), tmp_path / "full", settings,
                checkpoints=CheckpointManager(tmp_path / "full"))

    first = FitSettings(max_steps=3, final_validation=False, progress_bar=False)
    _fit(engine, _fresh_state(engine), tmp_path / "split", first, checkpoints=CheckpointManager(tmp_path / "split"))
    mgr = CheckpointManager(tmp_path / "split")
    restored = mgr.restore(_fresh_state(engine))
    assert restored.step == 3 and restored.data_position["index"] == 0  # 3 batches: one epoch done
    position = restored.data_position
    batches = FixedBatches(engine["batches"], index=position["epoch"] * 3 + position["index"])
    engine_resumed = dict(engine, key=restored.rng)
    resumed = _fit(engine_resumed, restored.state, tmp_path / "split", settings, batches=batches, checkpoints=mgr)

    assert resumed.step == full.step == 6
    for a, b in zip(jax.tree.leaves(jax.device_get(full.state)), jax.tree.leaves(jax.device_get(resumed.state))):
        np.testing.assert_array_equal(a, b)
    assert [int(r["step"]) for r in _rows(tmp_path / "split")] == [1, 2, 3, 4, 5, 6]
    assert mgr.all_steps() == [3, 6]
    assert engine["train_step"]._cache_size() == 1  # restored arrays did not trigger a recompile


def test_divergence_stops_without_saving_that_step(engine, tmp_path):
    calls = []

    def poisoned_step(state, base, batch, key):
        calls.append(1)
        if len(calls) == 3:  # the third step starts from NaN LoRA weights
            state = state.replace(lora=jax.tree.map(lambda x: x * np.nan, state.lora))
        return engine["train_step"](state, base, batch, key)

    settings = FitSettings(max_steps=6, save_interval=2, final_validation=False, progress_bar=False)
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(DivergenceError, match=r"^training diverged at step 3 \(loss nan"):
        _fit(dict(engine, train_step=poisoned_step), _fresh_state(engine), tmp_path, settings, checkpoints=mgr)
    assert mgr.all_steps() == [2]
    assert [int(r["step"]) for r in _rows(tmp_path)] == [1, 2]


def test_non_finite_validation_loss_stops_without_saving_that_step(engine, tmp_path):
    calls, n_val = [], len(engine["val"])

    def poisoned_eval(lora, base, batch):
        loss_sum, count = engine["eval_step"](lora, base, batch)
        calls.append(1)
        return (loss_sum * np.inf if len(calls) > n_val else loss_sum), count  # the 2nd validation is inf

    settings = FitSettings(max_steps=6, eval_interval=2, save_interval=2, final_validation=True, progress_bar=False)
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(DivergenceError, match=r"^the validation loss at step 4 is inf, so that step was not saved"):
        _fit(dict(engine, eval_step=poisoned_eval), _fresh_state(engine), tmp_path, settings, checkpoints=mgr,
             val_batches=engine["val"])
    assert mgr.all_steps() == [2]


def test_max_time_stops_and_saves(engine, tmp_path):
    settings = FitSettings(max_steps=TOTAL_STEPS, max_time=0.0, save_interval=10, final_validation=True,
                           progress_bar=False)
    mgr = CheckpointManager(tmp_path)
    result = _fit(engine, _fresh_state(engine), tmp_path, settings, checkpoints=mgr, val_batches=engine["val"])
    assert result.step == 1 and mgr.all_steps() == [1]
    assert mgr.restore(_fresh_state(engine)).val_loss == pytest.approx(result.val_loss)


def test_sigterm_saves_at_the_step_boundary_and_resumes_exactly(engine, tmp_path, caplog):
    """SIGTERM during step 4 (of 6, save_interval 5): step 4 finishes, is saved, the run stops; resuming from it
    ends bitwise equal to an uninterrupted run."""
    import signal

    settings = FitSettings(max_steps=6, save_interval=5, final_validation=False, progress_bar=False)
    full = _fit(engine, _fresh_state(engine), tmp_path / "full", settings)
    calls = []

    def step_then_signal(state, base, batch, key):
        calls.append(1)
        out = engine["train_step"](state, base, batch, key)
        if len(calls) == 4:
            signal.raise_signal(signal.SIGTERM)  # arrives while the step's results are still on their way
        return out

    mgr = CheckpointManager(tmp_path / "split")
    with caplog.at_level("WARNING"):
        stopped = _fit(dict(engine, train_step=step_then_signal), _fresh_state(engine), tmp_path / "split", settings,
                       checkpoints=mgr)
    assert stopped.preempted and stopped.step == 4 and mgr.all_steps() == [4]
    assert "SIGTERM received: saving at the end of this optimizer step" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler lives only as long as fit
    restored = mgr.restore(_fresh_state(engine))
    position = restored.data_position
    batches = FixedBatches(engine["batches"], index=position["epoch"] * 3 + position["index"])
    resumed = _fit(dict(engine, key=restored.rng), restored.state, tmp_path / "split", settings, batches=batches,
                   checkpoints=mgr)
    assert resumed.step == 6 and not resumed.preempted
    for a, b in zip(jax.tree.leaves(jax.device_get(full.state)), jax.tree.leaves(jax.device_get(resumed.state))):
        np.testing.assert_array_equal(a, b)


def test_second_sigterm_exits_at_once_without_saving(engine, tmp_path, monkeypatch):
    """A second SIGTERM while the first is pending: exit 143 at once (os._exit), the step not saved."""
    import signal

    from jaxlora.training import preemption

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(preemption.os, "_exit", fake_exit)
    calls = []

    def step_then_two_signals(state, base, batch, key):
        calls.append(1)
        out = engine["train_step"](state, base, batch, key)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
        return out

    settings = FitSettings(max_steps=6, save_interval=2, final_validation=False, progress_bar=False)
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(Exited, match="143"):
        _fit(dict(engine, train_step=step_then_two_signals), _fresh_state(engine), tmp_path, settings, checkpoints=mgr)
    assert mgr.all_steps() == [2]  # step 3 was not saved
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_finetune_pieces(tmp_path):
    from safetensors.numpy import load_file

    from jaxlora.finetune import run_length, save_lora_safetensors, step_batches

    assert run_length(10, epochs=3, max_steps=None) == 30 and run_length(10, epochs=3, max_steps=7) == 7
    assert run_length(10, epochs=None, max_steps=4) == 4
    rows = {"input_ids": np.arange(6 * 4).reshape(6, 4), "labels": np.zeros((6, 4))}
    (batch,) = list(step_batches(iter([rows]), accum=3))
    assert batch["input_ids"].shape == (3, 2, 4)
    assert batch["input_ids"][1, :, 0].tolist() == [4, 16]  # micro-batch 1: rows 1 and 4 (every 3rd from 1)
    lora = {"blocks": {"attn": {"q": {"lora_a": np.ones((2, 3), np.float32)}}}}
    save_lora_safetensors(lora, tmp_path / "final" / "lora.safetensors", metadata={"step": "5"})
    np.testing.assert_array_equal(load_file(tmp_path / "final" / "lora.safetensors")["blocks.attn.q.lora_a"],
                                  np.ones((2, 3)))


def test_finetune_job_end_to_end_and_resume(tmp_path, monkeypatch, caplog):
    """`finetune(cfg)` on a tiny Llama-shaped checkpoint dir (random weights: `load_model` is faked),
    a sentencepiece tokenizer and a JSON dataset; then resumed to a later step."""
    import jaxlora
    from _data_helpers import LLAMA2_TOKENIZER_CONFIG, make_sentencepiece_dir, write_json
    from safetensors.numpy import load_file

    from jaxlora.config import base_config
    from jaxlora.finetune import finetune

    ckpt = make_sentencepiece_dir(tmp_path / "ckpt", LLAMA2_TOKENIZER_CONFIG)
    write_json(ckpt / "config.json", {
        "model_type": "llama", "vocab_size": 400, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5})
    records = [{"instruction": f"say {w}", "input": "", "output": f"{w} {w}"} for w in
               "red green blue cat dog fish sun moon one two three four".split()]
    write_json(tmp_path / "data.json", records)

    from _train_helpers import fake_load_model

    monkeypatch.setattr(jaxlora, "load_model", fake_load_model, raising=False)
    cfg = base_config()
    cfg.checkpoint_dir, cfg.out_dir, cfg.precision = str(ckpt), str(tmp_path / "out"), "32-true"
    cfg.data.name, cfg.data.json_path, cfg.data.val_split_fraction = "json", str(tmp_path / "data.json"), 0.25
    cfg.data.prompt_style = "default"  # the bare instruction: short enough for 64-token rows
    cfg.train.update(global_batch_size=4, micro_batch_size=2, epochs=None, max_steps=2, save_interval=2,
                     lr_warmup_steps=1, max_seq_length=64)
    cfg.eval.update(interval=2, max_iters=2, max_new_tokens=None)
    result = finetune(cfg)
    assert result.step == 2 and result.val_loss is not None
    saved = load_file(tmp_path / "out" / "final" / "lora.safetensors")
    assert "blocks.attn.q.adapter.lora_a" in saved and saved["blocks.attn.q.adapter.lora_a"].dtype == np.float32

    cfg.train.max_steps, cfg.resume, cfg.eval.max_iters = 3, True, 1  # safe changes: logged
    with caplog.at_level("INFO", logger="jaxlora.finetune"):
        resumed = finetune(cfg)
    assert "resuming with a changed setting: eval.max_iters 2 -> 1" in caplog.text
    assert resumed.step == 3 and resumed.summary["steps"] == 1
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["2", "3"]
    assert [int(r["step"]) for r in _rows(tmp_path / "out")] == [1, 2, 3]

    monkeypatch.setattr(jaxlora, "load_model", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    for key, value, shown in (("lora_r", 4, "lora_r 8 -> 4"), ("optimizer.lr", 1e-3, "optimizer.lr 0.0002 -> 0.001"),
                              ("data.mask_prompt", True, "data.mask_prompt False -> True")):
        changed = cfg.copy_and_resolve_references()
        changed.update_from_flattened_dict({key: value})
        with pytest.raises(ConfigError, match=re.escape(f"the config differs from the one saved with the checkpoint "
                                                        f"in {shown}; resume with the saved values")):
            finetune(changed)

    dense_aux = cfg.copy_and_resolve_references()
    dense_aux.train.router_aux_loss_coef = 0.02
    with pytest.raises(ConfigError, match=r"train.router_aux_loss_coef=0.02 weighs the router loss of a mixture-of-"
                                          r"experts model, and .* has no experts; leave it at 0"):
        finetune(dense_aux)

    cfg.resume = False  # a fresh run into that out_dir would leave the old steps looking like its own
    with pytest.raises(ConfigError, match=r"already holds steps \[2, 3\].*resume=auto"):
        finetune(cfg)
