"""Faults a real run meets, on the embedded demo in child processes (the CLI as a user runs it): SIGTERM
(preemption: save at the step boundary, exit 0, resume exactly), SIGKILL at three moments, one inside a
checkpoint write, and a disk that fills up during a save (each resumed: the end is bitwise equal to an
uninterrupted run). The second-signal case is in test_loop.py (in-process: its timing cannot be hit
reliably from outside).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow  # child-process runs, ~2.5 min on 2 cores: CI runs them with `pytest -m slow`

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo"
STEPS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A slice of the demo data (32 train, 8 val records)."""
    path = tmp_path_factory.mktemp("data")
    for split, n in (("train", 32), ("val", 8)):
        lines = (DEMO / "data" / f"{split}.jsonl").read_text().splitlines()[:n]
        (path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return path


def _start(out: Path, data: Path, *extra: str, **kwargs) -> subprocess.Popen:
    argv = [sys.executable, "-m", "jaxlora", "finetune", f"--config={REPO / 'configs/finetune/demo/lora.py'}",
            f"--config.out_dir={out}", f"--config.data.json_path={data}", f"--config.train.max_steps={STEPS}",
            "--config.train.save_interval=2", "--config.eval.interval=2", "--config.eval.max_iters=1",
            "--config.eval.max_new_tokens=None", "--config.eval.initial_validation=False",
            "--config.checkpoint.max_to_keep=None", "--config.train.log_interval=1", "--config.resume=auto", *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120, poll: float = 0.005) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the moment to interrupt it:\n"
                                 f"{proc.stdout.read()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the moment to interrupt the run")
        time.sleep(poll)


def _logged_steps(out: Path) -> int:
    path = out / "metrics.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.is_file() else 0


def _saving(out: Path) -> bool:
    root = out / "checkpoints"
    return root.is_dir() and any("tmp" in p.name for p in root.iterdir())


def _complete_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
    assert all((root / str(s) / "commit_success.txt").is_file() for s in steps), "a step directory is half-written"
    return steps


def _final_lora(out: Path) -> dict:
    return load_file(out / "final" / "lora.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("reference") / "out"
    rc, log = _finish(_start(out, data))
    assert rc == 0, log
    return _final_lora(out)


def _assert_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_sigterm_saves_exits_0_and_the_resume_is_exact(tmp_path, data, reference):
    out = tmp_path / "out"
    proc = _start(out, data)
    _wait_for(lambda: _logged_steps(out) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    rc, log = _finish(proc)
    assert rc == 0, log
    assert "SIGTERM received" in log and "continue it with the same command and --config.resume=auto" in log
    steps = _complete_steps(out)
    assert steps and steps[-1] < STEPS and not (out / "final").exists()  # stopped early, no final adapter
    rc, log = _finish(_start(out, data))
    assert rc == 0, log
    _assert_equal(_final_lora(out), reference)


def test_sigkill_three_times_then_resume_is_bitwise_equal(tmp_path, data, reference):
    """Killed inside a checkpoint write, then twice at random moments of training; each time resumed."""
    out = tmp_path / "out"
    rng = random.Random(7)
    for _ in range(3):  # a small save can finish between seeing it and the kill: then try at the next one
        proc = _start(out, data)
        _wait_for(lambda: _saving(out), proc)  # a checkpoint directory is being written: kill now
        proc.kill()
        proc.wait()
        if _saving(out):  # the kill left the write unfinished (the next run clears it away)
            break
    assert _saving(out), "no kill landed inside a checkpoint write"
    for _ in range(2):
        proc = _start(out, data)
        done = _logged_steps(out)
        _wait_for(lambda: _logged_steps(out) > done, proc)  # past compilation, in the middle of training
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _complete_steps(out)
    rc, log = _finish(_start(out, data))
    assert rc == 0, log
    _assert_equal(_final_lora(out), reference)


def test_disk_full_during_a_save_keeps_the_previous_step(tmp_path, data, reference):
    """After step 2 is saved the child's files may no longer grow past a few KB (RLIMIT_FSIZE, as a full disk
    refuses writes): the next save fails with one sentence, step 2 stays complete and the resume is exact."""
    import resource

    out = tmp_path / "out"
    proc = _start(out, data, preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
    _wait_for(lambda: (out / "checkpoints" / "2" / "commit_success.txt").is_file(), proc)
    limit = (out / "metrics.csv").stat().st_size + 4096  # the CSV may grow a little; checkpoint files cannot
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    rc, log = _finish(proc)
    assert rc == 2, log
    # (Orbax's writer threads print their own failures too: the run's answer is its one `error:` line)
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: saving a checkpoint in "), log
    assert "File too large" in errors[0] and "the newest complete step, 2, is intact" in errors[0], errors
    assert _complete_steps(out)[-1] == 2
    rc, log = _finish(_start(out, data))
    assert rc == 0, log
    _assert_equal(_final_lora(out), reference)
