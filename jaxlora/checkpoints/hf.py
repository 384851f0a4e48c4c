"""Load HF checkpoints (config.json + safetensors) into a `GPT`, tensor by tensor.

Each family's key map (`models.families`) says, for every frozen parameter of our model, which HF
tensor holds it and how to bring it into our layout: HF linear weights are [out, in] and ours
[in, out]; fused q/k/v tensors (Phi-3, Falcon, GPT-NeoX) and Phi-3's fused gate/up are split;
Mixtral's per-expert tensors are stacked. Block params are assembled into one [n_layer, ...] array per parameter, so
at most one stacked parameter exists twice (host + device) at any time, never the whole model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxlora import storage
from jaxlora.errors import CheckpointError
from jaxlora.models.config import ModelConfig
from jaxlora.models.families import Source, ignored_tensors, key_map
from jaxlora.models import quant
from jaxlora.models.gpt import GPT
from jaxlora.models.lora import LoRAConfig, init_magnitudes
from jaxlora.training.sharding import param_shardings

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors some HF checkpoints store that are not weights: rotary and causal-mask buffers.
BUFFERS = re.compile(r"(rotary_emb\.inv_freq|\.attention\.masked_bias|\.attention\.bias)$")

log = logging.getLogger(__name__)


class SafetensorsReader:
    """Reads named tensors from `model.safetensors` or the shards named by its index, one at a time."""

    def __init__(self, directory: Path):
        single, index = directory / SINGLE_FILE, directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index (no readable weight_map): {e}") from None
            self.files = {name: directory / file for name, file in weight_map.items()}
            missing = sorted({str(f) for f in self.files.values() if not f.is_file()})
            if missing:
                raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(missing)}")
        elif single.is_file():
            self.files = {name: single for name in self._keys(single)}
        else:
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
        self.directory = directory
        self.used: set[str] = set()  # names handed out by `resolve`
        self._open: dict[Path, object] = {}

    @staticmethod
    def _keys(file: Path) -> list[str]:
        from safetensors import safe_open
        try:
            with safe_open(str(file), framework="flax") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"cannot read {file}: {e}") from None

    def resolve(self, names: tuple[str, ...]) -> str:
        for name in names:
            if name in self.files:
                self.used.add(name)
                return name
        raise CheckpointError(f"tensor {names[0]} is missing from the checkpoint in {self.directory}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """The tensor as a host numpy array in its stored dtype (bf16 through ml_dtypes)."""
        with jax.default_device(jax.local_devices(backend="cpu")[0]):  # this process's host device
            return np.asarray(self._handle(name).get_tensor(name))

    def _handle(self, name: str):
        from safetensors import safe_open
        file = self.files[name]
        if file not in self._open:
            try:
                self._open[file] = safe_open(str(file), framework="flax")
            except Exception as e:
                raise CheckpointError(f"cannot read {file}: {e}") from None
        return self._open[file]

    def close(self) -> None:
        self._open.clear()


def read_safetensors(path: str | os.PathLike, *, tensors: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """A small safetensors file (an adapter) read whole -> (its metadata, name -> numpy array); with
    tensors=False only the metadata (the header) is read and the dict is empty."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {path}: {e}") from None


def hf_shape(src: Source, ours: tuple[int, ...], config: ModelConfig) -> tuple[int, ...]:
    """The shape the raw HF tensor must have for our (per-layer, per-expert) shape `ours`."""
    shape = ours[::-1] if src.transpose and len(ours) == 2 else ours
    if src.part is None:
        return shape
    rows = (config.n_head + 2 * config.n_query_groups) * config.head_size if src.part[0] == "qkv" else 2 * shape[0]
    return (rows,) + shape[1:]


def fused_rows(w: np.ndarray, part: tuple, config: ModelConfig) -> np.ndarray:
    """The rows of a fused HF tensor [rows, ...] that belong to one of our layers."""
    if part[0] == "halves":
        half = w.shape[0] // 2
        return w[:half] if part[1] == 0 else w[half:]
    _, which, layout = part
    hs, n_kv = config.head_size, config.n_query_groups
    group = config.n_head // n_kv
    if layout == "contiguous":  # q heads | k heads | v heads
        q_rows = config.n_head * hs
        bounds = {"q": (0, q_rows), "k": (q_rows, q_rows + n_kv * hs), "v": (q_rows + n_kv * hs, None)}
        lo, hi = bounds[which]
        return w[lo:hi]
    # grouped: per kv head, `group` query heads then one k head then one v head
    g = w.reshape((n_kv, group + 2, hs) + w.shape[1:])
    sel = {"q": g[:, :group], "k": g[:, group], "v": g[:, group + 1]}[which]
    return sel.reshape((-1,) + w.shape[1:])


def _read(reader: SafetensorsReader, src: Source, ours: tuple[int, ...], config: ModelConfig, dtype,
          layer: int | None) -> np.ndarray:
    """One parameter (one layer's slice for block params) in our layout and `dtype`."""
    if src.experts:
        return np.stack([_read(reader, dataclasses.replace(src, names=tuple(n.replace("{e}", str(e)) for n in src.names),
                                                           experts=0), ours[1:], config, dtype, layer)
                         for e in range(src.experts)])
    names = tuple(n.format(i=layer) if layer is not None else n for n in src.names)
    name = reader.resolve(names)
    expected, got = hf_shape(src, ours, config), reader.shape(name)
    if got != expected:
        raise CheckpointError(f"tensor {name} has shape {list(got)} but the config.json implies {list(expected)}")
    w = reader.get(name)
    if src.part is not None:
        w = fused_rows(w, src.part, config)
    if src.transpose and w.ndim == 2:
        w = w.T
    return np.asarray(w, dtype=dtype)


def _place(array: np.ndarray, sharding) -> jax.Array:
    """A host array -> a device array; with a sharding, each device receives only its own shard."""
    if sharding is None:
        return jnp.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _fill(abstract: dict, sources: dict, reader, config, dtype, n_layer: int | None, where: str,
          shardings: dict | None, float_abstract: dict, quantize: str | None) -> dict:
    """Our nested param dict of ShapeDtypeStructs -> the same dict of arrays read from the checkpoint,
    each placed by the matching entry of `shardings` (None: on the default device).

    float_abstract: the same dict for the unquantized model; where `abstract` holds a quantized kernel
    (a dict of `models.quant` fields where the key map has one Source), each tensor is read in fp32
    (one layer at a time), quantized with `quantize` and stacked."""
    out = {}
    for key, leaf in abstract.items():
        src = sources.get(key) if isinstance(sources, dict) else None
        if src is None:
            raise CheckpointError(f"no checkpoint tensor is mapped to parameter {where}{key} for model_type "
                                  f"{config.model_type!r}")
        sharding = None if shardings is None else shardings[key]
        if isinstance(leaf, dict) and isinstance(src, Source):
            out[key] = _fill_quantized(leaf, src, reader, config, n_layer, sharding, float_abstract[key], quantize)
            continue
        if isinstance(leaf, dict):
            out[key] = _fill(leaf, src, reader, config, dtype, n_layer, f"{where}{key}.", sharding,
                             float_abstract[key], quantize)
            continue
        if n_layer is None:
            out[key] = _place(_read(reader, src, tuple(leaf.shape), config, dtype, None), sharding)
            continue
        stacked = np.empty(leaf.shape, dtype=dtype)  # [n_layer, ...]
        for i in range(n_layer):
            stacked[i] = _read(reader, src, tuple(leaf.shape[1:]), config, dtype, i)
        out[key] = _place(stacked, sharding)
        del stacked
    return out


def _fill_quantized(fields: dict, src: Source, reader, config, n_layer: int | None, shardings: dict | None,
                    float_leaf, quantize: str) -> dict:
    """One quantized kernel: each layer's tensor read in fp32, quantized, its fields stacked and placed."""
    shape = tuple(float_leaf.shape)
    if n_layer is None:
        q = quant.quantize(_read(reader, src, shape, config, np.float32, None), quantize)
        return {n: _place(q[n], None if shardings is None else shardings[n]) for n in fields}
    stacked = {n: np.empty(f.shape, f.dtype) for n, f in fields.items()}  # [n_layer, ...]
    for i in range(n_layer):
        q = quant.quantize(_read(reader, src, shape[1:], config, np.float32, i), quantize)
        for n in fields:
            stacked[n][i] = q[n]
    return {n: _place(a, None if shardings is None else shardings[n]) for n, a in stacked.items()}


def load_model(path: str | os.PathLike, *, dtype="float32", lora: LoRAConfig = LoRAConfig(), compute_dtype=None,
               quantize: str | None = None, remat: str = "none", scan_layers: bool = True, seed: int = 0,
               mesh: Mesh | None = None, attention_impl: str = "auto", moe_dispatch: str = "auto") -> GPT:
    """A `GPT` with the frozen weights of the HF checkpoint in `path` and freshly initialised LoRA.

    dtype: the frozen weights' dtype (LoRA weights are fp32); compute_dtype: activations (default
    `dtype`). LoRA A is drawn from `seed`, LoRA B is zero, so the model starts as the checkpoint.
    quantize: a `models.quant` format (or a name `quant.resolve` knows, e.g. "bnb.nf4") for the
    blocks' linear kernels, quantized tensor by tensor as they are read (QLoRA); others stay `dtype`.
    mesh: place each frozen weight sharded by `training.sharding.RULES` as it is read (every
    process reads the tensors, each device receives only its shard, so no device ever holds a
    whole stacked weight it does not own); None: on the default device. LoRA params stay there.
    """
    directory = storage.local_checkpoint(path)  # a URL: mirrored locally
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config = ModelConfig.from_hf_config(directory)
    reader = SafetensorsReader(directory)
    dtype = jnp.dtype(dtype)

    quantize = quant.resolve(quantize)

    def build(quantize=quantize):
        return GPT(config, lora, param_dtype=dtype, compute_dtype=compute_dtype, quantize=quantize,
                   scan_layers=scan_layers, remat=remat, attention_impl=attention_impl, moe_dispatch=moe_dispatch,
                   rngs=nnx.Rngs(seed))

    graphdef, lora_abstract, base_abstract = nnx.split(nnx.eval_shape(build), nnx.LoRAParam, ...)
    float_base = (nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: build(None)), nnx.LoRAParam, ...)[2])
                  if quantize else None)
    # Only the LoRA params are computed: XLA drops the unused frozen-weight initialisers.
    lora_state = jax.jit(lambda: nnx.state(build(), nnx.LoRAParam))()
    top, block = key_map(config)
    base = nnx.to_pure_dict(base_abstract)
    shardings = None if mesh is None else param_shardings(base_abstract, mesh)
    try:
        float_base = float_base or base
        filled = {k: _fill(v, block, reader, config, dtype, config.n_layer, "blocks.",
                           None if shardings is None else shardings[k], float_base[k], quantize) if k == "blocks" else
                  _fill({k: v}, top, reader, config, dtype, None, "", shardings, float_base, quantize)[k]
                  for k, v in base.items()}
    finally:
        reader.close()
    skipped = ignored_tensors(config)
    left_out = [n for n in set(reader.files) - reader.used if skipped and re.search(skipped, n)]
    if left_out:
        log.info("%s: %d tensor(s) of the wrapping model are not part of the %s model and were left out (%s ...)",
                 directory, len(left_out), config.model_type, sorted(left_out)[0])
    unused = sorted(n for n in set(reader.files) - reader.used - set(left_out) if not BUFFERS.search(n))
    if unused:
        log.warning("%s holds %d tensor(s) that the %s model has no place for; they were not loaded, so its "
                    "outputs may differ from the checkpoint's own model: %s", directory, len(unused), config.name,
                    ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else ""))
    nnx.replace_by_pure_dict(base_abstract, filled)
    del lora_abstract
    model = nnx.merge(graphdef, lora_state, base_abstract)
    if lora.use_dora:
        init_magnitudes(model)  # the column norms of the loaded weights
    return model
