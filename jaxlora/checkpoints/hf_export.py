"""Write a `GPT` (LoRA merged) as an HF checkpoint directory that transformers loads.

The tensors are the exact inverse of the family's key map (`models.families`): our [in, out] kernels are transposed back to
HF's [out, in], fused tensors (Phi-3's qkv and gate/up, Falcon/GPT-NeoX query_key_value) are
reassembled by writing each part into the rows that `hf.fused_rows` reads it from, stacked layers and
experts are unstacked into HF's per-layer / per-expert names. One layer's tensors are on the host
at a time (plus the shard being filled).

The directory is built next to its destination and renamed into place at the end, so a crash
never leaves a half-written directory under the requested name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxlora.checkpoints.hf import INDEX_FILE, SINGLE_FILE, fused_rows, hf_shape
from jaxlora.errors import CheckpointError
from jaxlora.models.config import ModelConfig
from jaxlora.models.families import Source, check_hf_config, export_config, hf_config_dict, key_map
from jaxlora.models.gpt import GPT
from jaxlora.models.linear import linear_layers
from jaxlora.models.lora import lora_layers

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # transformers 4's default max_shard_size ("5GB")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def save_hf_checkpoint(model: GPT, out_dir: str | os.PathLike, *, dtype=None,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, hf_config: dict | None = None,
                       extra_files: Sequence[str | os.PathLike] = ()) -> Path:
    """Write config.json, model.safetensors (or shards + index) and generation_config.json to `out_dir`.

    model: a GPT without LoRA adapters (`merge_lora` it first). dtype: the stored dtype (default:
    the params' own). hf_config: the base checkpoint's config.json to write instead of a generated
    one (it must describe `model`; its token ids go into generation_config.json). extra_files:
    copied into the directory (tokenizer files; a copied generation_config.json replaces ours).
    `out_dir` must not exist or be empty. Returns its path.
    """
    adapted = ["/".join(map(str, path)) for path, _ in lora_layers(model)]
    if adapted:
        raise CheckpointError(f"the model still has unmerged LoRA adapters ({', '.join(adapted)}); "
                              "fold them in with jaxlora.merge_lora(model) before saving an HF checkpoint")
    quantized = ["/".join(map(str, path)) for path, layer in linear_layers(model) if layer.quantized]
    if quantized:
        raise CheckpointError(f"the model's weights are quantized ({quantized[0]}, ...); jaxlora.merge_lora(model) "
                              "dequantises them before saving an HF checkpoint")
    params = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    dtype = np.dtype(dtype or jax.tree.leaves(params)[0].dtype)
    config = export_config(model.config)
    if config is not model.config and hf_config is not None:  # the wrapped model alone (Gemma 3's text model)
        text = hf_config.get("text_config") or {}
        hf_config = {**hf_config_dict(config, dtype.name), **{k: text.get(k, hf_config.get(k)) for k in TOKEN_IDS
                                                               if text.get(k, hf_config.get(k)) is not None}}
    if hf_config is None:
        hf = hf_config_dict(config, dtype.name)
    else:
        if hf_config.get("tie_word_embeddings") and not config.tie_embeddings:  # untied by `merge_lora`
            hf_config = {**hf_config, "tie_word_embeddings": False}
        check_hf_config(config, hf_config)
        keys = [k for k in ("torch_dtype", "dtype") if k in hf_config] or ["torch_dtype"]
        hf = {**hf_config, **{k: dtype.name for k in keys}}
    generation = {"_from_model_config": True, **{k: hf[k] for k in TOKEN_IDS if hf.get(k) is not None}}
    with atomic_directory(out_dir) as tmp:
        _write_json(tmp / "config.json", hf)
        _write_json(tmp / "generation_config.json", generation)
        write_safetensors(hf_tensors(params, config, dtype), tmp, max_shard_bytes)
        for f in extra_files:
            shutil.copyfile(f, tmp / Path(f).name)
    return Path(out_dir)


def hf_tensors(params: dict, config: ModelConfig, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, HF-layout array) for every frozen param: embedding, layer 0, 1, ..., final norm and head.

    params: our nested param dict (`nnx.to_pure_dict` of the frozen state, blocks stacked [n_layer, ...]).
    """
    top, block = key_map(config)
    top_leaves = list(_leaves(params, top, "", exclude="blocks"))
    first = [x for x in top_leaves if x[0] == ("wte",)]
    yield from _assemble([(src, arr) for _, src, arr in first], config, dtype, None)
    blocks = list(_leaves(params["blocks"], block, "blocks."))
    for i in range(config.n_layer):
        yield from _assemble([(src, jax.device_get(arr[i])) for _, src, arr in blocks], config, dtype, i)
    yield from _assemble([(src, arr) for path, src, arr in top_leaves if path != ("wte",)], config, dtype, None)


def _leaves(params: dict, sources: dict, where: str, exclude: str | None = None):
    """(path, Source, array) for every param in `params`; a param with no Source is an error."""
    for key, value in params.items():
        if key == exclude:
            continue
        src = sources.get(key) if isinstance(sources, dict) else None
        if src is None:
            raise CheckpointError(f"no checkpoint tensor is mapped to parameter {where}{key}")
        if isinstance(value, dict):
            for path, s, arr in _leaves(value, src, f"{where}{key}."):
                yield (key,) + path, s, arr
        else:
            yield (key,), src, value


def _assemble(leaves: list[tuple[Source, np.ndarray]], config: ModelConfig, dtype, layer: int | None):
    """One layer's (or the top level's) HF tensors from our params: transpose, unstack experts, fuse parts."""
    fused: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (tensor, rows written)
    out: list[tuple[str, np.ndarray]] = []
    for src, arr in leaves:
        arr = np.asarray(jax.device_get(arr))
        if src.experts:
            pieces = [(dataclasses.replace(src, names=tuple(n.replace("{e}", str(e)) for n in src.names), experts=0),
                       arr[e]) for e in range(src.experts)]
        else:
            pieces = [(src, arr)]
        for s, w in pieces:
            # names[-1] is the name transformers' save_pretrained writes (see `hf.Source`).
            name = s.names[-1].format(i=layer) if layer is not None else s.names[-1]
            shape = hf_shape(s, w.shape, config)
            if s.transpose and w.ndim == 2:
                w = w.T
            w = w.astype(dtype)
            if s.part is None:
                out.append((name, np.ascontiguousarray(w)))
                continue
            if name not in fused:
                fused[name] = (np.zeros(shape, dtype), np.zeros(shape[0], bool))
            tensor, written = fused[name]
            rows = fused_rows(np.arange(shape[0]), s.part, config)
            tensor[rows] = w
            written[rows] = True
    for name, (tensor, written) in fused.items():
        if not written.all():
            raise CheckpointError(f"the parameters of this model fill only part of the fused tensor {name}")
        out.append((name, tensor))
    return out


def write_safetensors(tensors: Iterator[tuple[str, np.ndarray]], directory: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors + the index once the tensors exceed one shard."""
    from safetensors.numpy import save_file

    shards: list[list[str]] = []
    current: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        name = f"shard-{len(shards):05d}.tmp"
        save_file(current, str(directory / name), metadata={"format": "pt"})
        shards.append(list(current))
        current.clear()

    for name, w in tensors:
        if current and size + w.nbytes > max_shard_bytes:
            flush()
            size = 0
        current[name] = w
        size += w.nbytes
        total += w.nbytes
    if current or not shards:
        flush()
    if len(shards) == 1:
        os.replace(directory / "shard-00000.tmp", directory / SINGLE_FILE)
        return
    weight_map = {}
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(directory / f"shard-{k:05d}.tmp", directory / file)
        weight_map.update({n: file for n in names})
    _write_json(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary directory next to `out_dir`, renamed to `out_dir` when the block succeeds
    (and deleted when it fails). `out_dir` must not exist or be an empty directory."""
    out = check_output_directory(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its directory is private (0700), and the result should get the usual mode.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_directory(out_dir: str | os.PathLike) -> Path:
    """CheckpointError unless `out_dir` is absent or an empty directory and can be created; its Path."""
    out = Path(out_dir)
    if out.is_file():
        raise CheckpointError(f"{out} is a file, not a directory; choose a new output directory")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} already exists and is not an empty directory; choose a new output "
                              "directory or remove it")
    existing = next(p for p in out.absolute().parents if p.exists())
    if not existing.is_dir():
        raise CheckpointError(f"{out} cannot be created: {existing} is a file; choose a new output directory")
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
