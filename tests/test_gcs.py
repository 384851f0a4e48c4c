"""out_dir=gs://... against a local GCS emulator (gcp-storage-emulator on 127.0.0.1, in memory; see
_gcs_helpers): Orbax step checkpoints (tensorstore's GCS driver for the arrays, gcsfs for the rest),
metrics.csv / summary.json / the final adapter, resume=auto from the bucket bitwise equal to an
uninterrupted local run, a crashed (uncommitted) and a broken newest step skipped, and a gs:// adapter
read back."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest

# found, not imported: gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT (set by the `gcs` fixture) at import
for _package in ("gcsfs", "gcp_storage_emulator"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"{_package} is not installed (the test extra installs it)", allow_module_level=True)

from _gcs_helpers import BUCKET, emulator, gcs_fs, load_safetensors_bytes, tiny_finetune_config  # noqa: E402
from _train_helpers import fake_load_model  # noqa: E402


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's environment, set for this module's tests (and their subprocesses)."""
    proc, env = emulator(tmp_path_factory.mktemp("gcs") / "emulator.log")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def fake_model(monkeypatch):
    import jaxlora
    monkeypatch.setattr(jaxlora, "load_model", fake_load_model, raising=False)


def _rows(fs, path: str) -> list[int]:
    import csv
    import io
    return [int(r["step"]) for r in csv.DictReader(io.StringIO(fs.cat(path).decode())) if r.get("loss")]


def test_finetune_to_gcs_then_resume_equals_an_uninterrupted_local_run(gcs, fake_model, tmp_path, caplog):
    from jaxlora.finetune import finetune

    url, run = f"gs://{BUCKET}/run1", f"{BUCKET}/run1"
    cfg = tiny_finetune_config(tmp_path, url, max_steps=2)
    assert finetune(cfg).step == 2
    fs = gcs_fs()
    for name in ("checkpoints/2/commit_success.txt", "checkpoints/2/lora/manifest.ocdbt", "metrics.csv",
                 "summary.json", "final/lora.safetensors", "final/adapter_config.json",
                 "final/adapter_model.safetensors"):
        assert fs.isfile(f"{run}/{name}"), name
    assert _rows(fs, f"{run}/metrics.csv") == [1, 2]

    cfg.train.max_steps, cfg.resume = 3, "auto"
    with caplog.at_level(logging.INFO, logger="jaxlora.finetune"):
        resumed = finetune(cfg)
    assert f"resuming from step 2 of {url}/checkpoints" in caplog.text
    assert resumed.step == 3 and resumed.summary["steps"] == 1
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{run}/checkpoints")) == ["2", "3"]
    assert _rows(fs, f"{run}/metrics.csv") == [1, 2, 3]

    local = tiny_finetune_config(tmp_path, str(tmp_path / "local"), max_steps=3)
    finetune(local)
    from safetensors.numpy import load_file
    want = load_file(tmp_path / "local" / "final" / "lora.safetensors")
    got = load_safetensors_bytes(fs.cat(f"{run}/final/lora.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)

    # the adapter read back from the bucket (generate / evaluate / merge / export-peft read it this way)
    from jaxlora.checkpoints.adapters import read_adapter, run_config
    for adapter in (url, f"{url}/final/lora.safetensors", f"{url}/final"):
        _, params = read_adapter(cfg.checkpoint_dir, adapter)
        np.testing.assert_array_equal(params["blocks"]["attn"]["q"]["adapter"]["lora_a"],
                                      want["blocks.attn.q.adapter.lora_a"])
    assert run_config(url)["train"]["max_steps"] == 3
    _, peft = read_adapter(cfg.checkpoint_dir, f"{url}/final/adapter_config.json")  # the PEFT files
    assert peft.keys() == params.keys()


def test_resume_skips_an_uncommitted_and_a_broken_newest_step(gcs, fake_model, tmp_path, caplog):
    from jaxlora.finetune import finetune

    url, run = f"gs://{BUCKET}/run2", f"{BUCKET}/run2"
    cfg = tiny_finetune_config(tmp_path, url, max_steps=2)
    finetune(cfg)
    fs = gcs_fs()
    step = f"{run}/checkpoints"
    # step 4: a save that crashed mid-way (on GCS Orbax writes in place and commits with commit_success.txt last)
    fs.copy(f"{step}/2", f"{step}/4", recursive=True)
    fs.rm(f"{step}/4/commit_success.txt")
    # step 6: committed, but its arrays' data objects are gone (deleted or never fully written)
    fs.copy(f"{step}/2", f"{step}/6", recursive=True)
    for item in ("lora", "opt_state"):
        for path in fs.find(f"{step}/6/{item}"):
            if "/d/" in path:
                fs.rm(path)
    fs.invalidate_cache()

    cfg.train.max_steps, cfg.resume = 3, "auto"
    with caplog.at_level(logging.INFO):
        resumed = finetune(cfg)
    assert "skipping checkpoint step 6" in caplog.text
    assert f"resuming from step 2 of {url}/checkpoints" in caplog.text
    assert resumed.step == 3 and resumed.summary["steps"] == 1
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(step))
    assert "6.corrupt" in names and "6" not in names and "3" in names, names
    assert _rows(fs, f"{run}/metrics.csv") == [1, 2, 3]


def test_gcs_out_dir_errors_in_one_sentence(gcs, fake_model, tmp_path, monkeypatch):
    from jaxlora import storage
    from jaxlora.errors import ConfigError
    from jaxlora.finetune import finetune

    cfg = tiny_finetune_config(tmp_path, "gs://no-such-bucket/run", max_steps=1)
    with pytest.raises(ConfigError, match="the bucket gs://no-such-bucket does not exist"):
        finetune(cfg)

    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "gcsfs" else real_import(name, *a, **k))
    with pytest.raises(ConfigError, match=r'needs the gcsfs package: pip install "jaxlora\[gcs\]"'):
        storage.as_path(f"gs://{BUCKET}/run")


def test_base_checkpoint_from_a_url_is_mirrored_once_and_is_the_same_model(gcs, tmp_path, monkeypatch, capsys):
    """checkpoint_dir=gs://...: config, tokenizer and weights mirrored into JAXLORA_CACHE (once: a second
    use downloads nothing), loaded as the local directory is, and used so by the CLI; a prefix without
    config.json is one sentence."""
    from pathlib import Path

    import jax

    import jaxlora
    from jaxlora import cli, storage
    from jaxlora.errors import CheckpointError

    base = Path(__file__).parent.parent / "demo" / "base"
    fs = gcs_fs()
    for f in base.iterdir():
        fs.put_file(str(f), f"{BUCKET}/models/demo-base/{f.name}")
    fs.pipe(f"{BUCKET}/models/demo-base/README.md", b"not mirrored")
    monkeypatch.setenv("JAXLORA_CACHE", str(tmp_path / "cache"))
    url = f"gs://{BUCKET}/models/demo-base"

    local = storage.local_checkpoint(url, weights=False)
    assert local == tmp_path / "cache" / "remote" / "gs" / BUCKET / "models" / "demo-base"
    assert sorted(p.name for p in local.iterdir()) == sorted(f.name for f in base.iterdir() if f.suffix != ".safetensors")
    assert storage.local_checkpoint(url) == local
    assert sorted(p.name for p in local.iterdir()) == sorted(f.name for f in base.iterdir())
    for f in base.iterdir():
        assert (local / f.name).read_bytes() == f.read_bytes(), f.name
    stamps = {p.name: p.stat().st_mtime_ns for p in local.iterdir()}
    model = jaxlora.load_model(url)  # mirrored already: nothing is downloaded again
    assert {p.name: p.stat().st_mtime_ns for p in local.iterdir()} == stamps
    want = jax.tree.leaves(jaxlora.split_lora(jaxlora.load_model(base))[2])
    for a, b in zip(jax.tree.leaves(jaxlora.split_lora(model)[2]), want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    outputs = []
    for checkpoint in (url, str(base)):
        cli.main(["generate", f"--checkpoint_dir={checkpoint}", "--prompt=What is a donkey?", "--max_new_tokens=4",
                  "--temperature=0"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()

    with pytest.raises(CheckpointError, match=f"checkpoint_dir gs://{BUCKET}/models/nothing holds no config.json"):
        storage.local_checkpoint(f"gs://{BUCKET}/models/nothing")
    with pytest.raises(SystemExit):
        cli.main(["generate", f"--checkpoint_dir=gs://{BUCKET}/models/nothing", "--prompt=hi"])
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: checkpoint_dir gs://{BUCKET}/models/nothing holds no config.json")


def test_finetune_reads_its_base_from_a_url(gcs, fake_model, tmp_path, monkeypatch):
    """The finetune job with checkpoint_dir=gs://... (tokenizer and config mirrored) trains as from the local copy."""
    from jaxlora.finetune import finetune

    monkeypatch.setenv("JAXLORA_CACHE", str(tmp_path / "cache"))
    local_cfg = tiny_finetune_config(tmp_path, str(tmp_path / "local"), max_steps=1)
    fs = gcs_fs()
    for f in (tmp_path / "ckpt").iterdir():
        fs.put_file(str(f), f"{BUCKET}/models/tiny/{f.name}")
    url_cfg = tiny_finetune_config(tmp_path, str(tmp_path / "from-url"), max_steps=1)
    url_cfg.checkpoint_dir = f"gs://{BUCKET}/models/tiny"
    finetune(local_cfg)
    finetune(url_cfg)
    from safetensors.numpy import load_file
    want = load_file(tmp_path / "local" / "final" / "lora.safetensors")
    got = load_file(tmp_path / "from-url" / "final" / "lora.safetensors")
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    import json
    peft = json.loads((tmp_path / "from-url" / "final" / "adapter_config.json").read_text())
    assert peft["base_model_name_or_path"] == f"gs://{BUCKET}/models/tiny"
