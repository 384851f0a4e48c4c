"""Load a base checkpoint with a trained LoRA adapter: jaxlora's `lora.safetensors` or a PEFT adapter.

An adapter is named by a finetune run directory (`<out_dir>/final/lora.safetensors`), a
`lora.safetensors` file or the directory holding it, or a PEFT adapter directory
(adapter_config.json + adapter_model.safetensors) or one of its two files. Any of these may be a URL
(gs://bucket/run, ...: see `jaxlora.storage`); its adapter files are downloaded to a local temporary
directory once per process and read from there. The base checkpoint (`checkpoint_dir`) must be local.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxlora import storage
from jaxlora.checkpoints.hf import load_model, read_safetensors
from jaxlora.checkpoints.peft import CONFIG_FILE, lora_shapes, read_peft_adapter
from jaxlora.errors import CheckpointError, ConfigError
from jaxlora.models.config import ModelConfig
from jaxlora.models.gpt import GPT
from jaxlora.models.lora import LoRAConfig

LORA_FILE = "lora.safetensors"


def load_with_adapter(checkpoint_dir: str | os.PathLike, adapter: str | os.PathLike, *, dtype="float32",
                      compute_dtype=None, quantize: str | None = None) -> GPT:
    """The base checkpoint in `checkpoint_dir` with the LoRA adapter `adapter` (unmerged, LoRA weights fp32);
    quantize: the base's blocks quantized as `load_model` does (QLoRA)."""
    lora, params = read_adapter(checkpoint_dir, adapter)
    model = load_model(checkpoint_dir, dtype=dtype, compute_dtype=compute_dtype, lora=lora, quantize=quantize)
    set_lora_params(model, params, str(adapter))
    return model


def read_adapter(checkpoint_dir: str | os.PathLike, adapter: str | os.PathLike) -> tuple[LoRAConfig, dict]:
    """(LoRAConfig, nested LoRA params as numpy) of `adapter`, checked against the base checkpoint's shapes."""
    checkpoint_dir = storage.local_checkpoint(checkpoint_dir, weights=False)  # a URL: its config, mirrored
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist")
    config = ModelConfig.from_hf_config(checkpoint_dir)
    kind, path = resolve_adapter(adapter)
    lora, params = read_peft_adapter(path, config) if kind == "peft" else read_lora_safetensors(path)
    _check(flatten_dict(lora_shapes(config, lora), sep="."), flatten_dict(params, sep="."), str(path))
    return lora, params


def resolve_adapter(adapter: str | os.PathLike) -> tuple[str, Path]:
    """-> ("jaxlora", the lora.safetensors file) or ("peft", the adapter directory); local paths (a URL's
    adapter files are downloaded first)."""
    if storage.is_url(adapter):
        return _download_adapter(str(adapter))
    path = Path(adapter)
    if path.is_file():
        if path.name in ("adapter_model.safetensors", CONFIG_FILE):
            return "peft", path.parent
        return "jaxlora", path
    for candidate in (path / "final" / LORA_FILE, path / LORA_FILE):
        if candidate.is_file():
            return "jaxlora", candidate
    if (path / CONFIG_FILE).is_file():
        return "peft", path
    if not path.exists():
        raise CheckpointError(f"adapter {path} does not exist")
    raise CheckpointError(f"no adapter found in {path}: expected final/{LORA_FILE}, {LORA_FILE} or a PEFT "
                          f"{CONFIG_FILE}")


def run_config(adapter: str | os.PathLike) -> dict | None:
    """The resolved finetune config of the run that trained `adapter` (a run's out_dir or its lora.safetensors),
    from the file's metadata or else the run's newest checkpoint; None for other adapters (e.g. PEFT's)."""
    kind, path = resolve_adapter(adapter)
    if kind != "jaxlora":
        return None
    metadata, _ = read_safetensors(path, tensors=False)
    if "config" in metadata:
        try:
            return json.loads(metadata["config"])
        except ValueError as e:
            raise CheckpointError(f"{path} has an unreadable run config in its metadata: {e}") from None
    if storage.is_url(adapter):
        path = _remote_source[path]
    run_dir = path.parent.parent if path.parent.name == "final" else None
    if run_dir is None or not (run_dir / "checkpoints").is_dir():
        return None
    from jaxlora.checkpoints.orbax import CheckpointManager

    manager = CheckpointManager(run_dir, read_only=True)
    try:
        return manager.saved_config()
    finally:
        manager.close()


_downloaded: dict[str, tuple[str, Path]] = {}  # adapter URL -> resolve_adapter's answer, local
_remote_source: dict[Path, "storage.AnyPath"] = {}  # a downloaded lora.safetensors -> its URL path


def _download_adapter(url: str) -> tuple[str, Path]:
    """resolve_adapter for a URL: find the adapter's files there as for a local path and download them."""
    if url in _downloaded:
        return _downloaded[url]
    remote = storage.as_path(url)
    try:
        if remote.is_file():
            kind, files = ("peft", remote.parent) if remote.name in ("adapter_model.safetensors", CONFIG_FILE) \
                else ("jaxlora", remote)
        else:
            kind = files = None
            for candidate in (remote / "final" / LORA_FILE, remote / LORA_FILE):
                if candidate.is_file():
                    kind, files = "jaxlora", candidate
                    break
            if kind is None and (remote / CONFIG_FILE).is_file():
                kind, files = "peft", remote
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - credentials, network: whatever the store raises
        raise CheckpointError(f"adapter {url} cannot be read: {type(e).__name__}: {str(e).strip()[:200]}") from None
    if kind is None:
        raise CheckpointError(f"no adapter found at {url}: expected final/{LORA_FILE}, {LORA_FILE} or a PEFT "
                              f"{CONFIG_FILE}")
    local = storage.local_dir("jaxlora-adapter-")
    if kind == "jaxlora":
        target = storage.download(files, local / files.parent.name / LORA_FILE)
        _remote_source[target] = files
    else:
        for name in (CONFIG_FILE, "adapter_model.safetensors"):
            storage.download(files / name, local / name)
        target = local
    _downloaded[url] = (kind, target)
    return kind, target


def read_lora_safetensors(path: str | os.PathLike) -> tuple[LoRAConfig, dict]:
    """A jaxlora `lora.safetensors` -> (its LoRAConfig from the metadata, nested LoRA params as numpy)."""
    metadata, flat = read_safetensors(path)
    if "lora" not in metadata:
        raise CheckpointError(f"{path} has no 'lora' metadata (the LoRA settings); it was not written by jaxlora")
    try:
        lora = LoRAConfig(**json.loads(metadata["lora"]))
    except (ValueError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path} has unreadable LoRA settings in its metadata: {e}") from None
    # written before adapters were modules of their own: "<layer>.lora_a" is now "<layer>.adapter.lora_a"
    flat = {re.sub(r"(?<!\.adapter)\.(lora_[ab])$", r".adapter.\1", k): v for k, v in flat.items()}
    return lora, unflatten_dict(flat, sep=".")


def set_lora_params(model: GPT, params: dict, source: str) -> None:
    """Replace `model`'s LoRA A/B by `params` (nested dict); every key and shape must match."""
    state = nnx.state(model, nnx.LoRAParam)
    expected = flatten_dict(nnx.to_pure_dict(state), sep=".")
    given = flatten_dict(params, sep=".")
    _check(expected, given, source)
    arrays = {k: jnp.asarray(np.asarray(v), expected[k].dtype) for k, v in given.items()}
    nnx.replace_by_pure_dict(state, unflatten_dict(arrays, sep="."))
    nnx.update(model, state)


def _check(expected: dict, given: dict, source: str) -> None:
    """Flat LoRA param dicts: the same keys, the same shapes."""
    missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing:
        raise CheckpointError(f"{source} has no tensor for LoRA parameter {missing[0]}")
    if extra:
        raise CheckpointError(f"{source} has tensor {extra[0]}, which the model with its LoRA settings does not have")
    for key, want in expected.items():
        if tuple(given[key].shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: {key} has shape {list(given[key].shape)} but the base checkpoint "
                                  f"and the adapter's LoRA settings imply {list(want.shape)}")
