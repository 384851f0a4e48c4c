"""Two processes on 127.0.0.1 with 2 CPU devices each (jax.distributed, gloo collectives) run the real
`jaxlora finetune` job on a tiny HF Llama checkpoint: 2 steps on a (2, 2, 1) mesh, saved, then resumed
on a (1, 2, 2) mesh to step 4. One process on one device runs the same 4 steps; the LoRA params must
match, and that single process must read the two-process checkpoint onto its own device."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
from _multidevice_helpers import subprocess_env, write_dataset, write_tiny_llama

from jaxlora.errors import ConfigError
from jaxlora.training.sharding import initialize_distributed

# Constant lr (min_lr = lr, no warmup), so the schedule does not depend on the run length; the same
# micro-batch of 4 rows everywhere (micro_batch_size x data-parallel size), so LoRA dropout draws
# the same masks on every mesh.
COMMON = ["--config.data.name=json", "--config.data.val_split_fraction=0.25", "--config.data.prompt_style=default",
          "--config.precision=32-true", "--config.lora_r=4", "--config.lora_alpha=8", "--config.lora_dropout=0.1",
          "--config.lora_query=true", "--config.lora_value=true", "--config.lora_mlp=true",
          "--config.optimizer.lr=0.01", "--config.train.min_lr=0.01", "--config.train.lr_warmup_steps=0",
          "--config.train.global_batch_size=8", "--config.train.epochs=None", "--config.train.save_interval=2",
          "--config.train.max_seq_length=48", "--config.eval.interval=2", "--config.eval.max_iters=2",
          "--config.eval.max_new_tokens=None", "--config.checkpoint.async_save=false"]

REFERENCE = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from safetensors.numpy import load_file
    from jaxlora import cli
    from jaxlora.checkpoints.orbax import CheckpointManager
    from jaxlora import finetune

    multi_out, args = sys.argv[1], sys.argv[2:]
    assert jax.process_count() == 1 and jax.device_count() == 1
    results = []
    original = finetune.fit
    finetune.fit = lambda *a, **k: results.append(original(*a, **k)) or results[-1]
    cli.main(["finetune", *args])
    (result,) = results
    assert result.step == 4
    mine = load_file(f"{args[-1].split('=', 1)[1]}/final/lora.safetensors")
    theirs = load_file(f"{multi_out}/final/lora.safetensors")
    assert sorted(mine) == sorted(theirs)
    print("lora max abs diff", max(float(np.max(np.abs(mine[k] - theirs[k]))) for k in mine))

    restored = CheckpointManager(multi_out, read_only=True).restore(result.state)
    assert restored.step == 4 and restored.val_loss is not None
    leaves = jax.tree.leaves(restored.state)
    assert all(x.sharding.device_set == {jax.devices()[0]} for x in leaves)
    diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(jax.device_get(result.state)), jax.tree.leaves(jax.device_get(leaves))))
    print("checkpoint max abs diff", diff)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(args: list[str], log_dir: Path) -> None:
    port = _free_port()
    procs = []
    for i in range(2):
        dist = [f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}"]
        log = open(log_dir / f"process{i}.log", "w")
        command = [sys.executable, "-m", "jaxlora", "finetune", *args, *dist]
        procs.append((subprocess.Popen(command, env=subprocess_env(2), stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [p.wait(timeout=400) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = "\n".join((log_dir / f"process{i}.log").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0], logs


def test_two_processes_match_one_process_and_resume_on_another_mesh(tmp_path):
    ckpt = write_tiny_llama(tmp_path / "ckpt")
    data = write_dataset(tmp_path / "data.json")
    base = [*COMMON, f"--config.checkpoint_dir={ckpt}", f"--config.data.json_path={data}"]
    multi = tmp_path / "multi"
    _two_processes([*base, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.train.micro_batch_size=1",
                    "--config.train.max_steps=2", f"--config.out_dir={multi}"], tmp_path)
    assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == ["2"]
    _two_processes([*base, "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                    "--config.train.micro_batch_size=2", "--config.train.max_steps=4", "--config.resume=true",
                    f"--config.out_dir={multi}"], tmp_path)
    assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == ["2", "4"]

    proc = subprocess.run([sys.executable, "-c", REFERENCE, str(multi), *base, "--config.train.micro_batch_size=4",
                           "--config.train.max_steps=4", f"--config.out_dir={tmp_path / 'single'}"],
                          env=subprocess_env(1), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    diffs = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in proc.stdout.splitlines()
             if "max abs diff" in line}
    # measured: ~2e-7 (sums over 4 devices and 2 processes in another order)
    assert len(diffs) == 2 and max(diffs.values()) <= 1e-5, diffs


def test_initialize_distributed_takes_config_then_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert initialize_distributed() is False and calls == []  # nothing set, no TPU: one process
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert initialize_distributed(None, None, 1) is True  # the config's process id wins
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 1}]
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID='one' is not an integer"):
        initialize_distributed()
