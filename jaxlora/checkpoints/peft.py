"""LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors), both ways.

Where our adapters live in HF terms comes from the family's key map (`models.families`): every `Linear` is a "site" whose
kernel Source names the transformers module (`names[0]` minus ".weight"). PEFT stores
`lora_A.weight` [r, in] and `lora_B.weight` [out, r] per module, with scale lora_alpha / r
(or / sqrt(r) with rsLoRA), the same semantics as ours.

Fused HF modules (Phi-3's qkv_proj and gate_up_proj, Falcon/GPT-NeoX query_key_value) hold
several of our layers. Their independent adapters (A_p, B_p) become one PEFT adapter of rank
k * r (k adapted parts): A = [A_1; ...; A_k] stacked along the rank, B block-structured (part p's
rows, as `hf.fused_rows` reads them, hold B_p in rank block p, zeros elsewhere), so B A = the
per-part deltas exactly. The scale is kept through `rank_pattern` / `alpha_pattern`
(alpha * k, or alpha * sqrt(k) with rsLoRA). The safetensors metadata records our LoRAConfig, so
such a file loads back into rank-r adapters. A PEFT-trained fused adapter of rank r (dense A, B)
loads into rank-r adapters on each part (A shared, B's rows of that part): also exact.

The experts of a mixture-of-experts MLP are no modules in transformers 5 but fused 3-D parameters; their
adapters travel as PEFT's `target_parameters` (`peft_experts`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np

from jaxlora.checkpoints import peft_experts
from jaxlora.checkpoints.hf import fused_rows, hf_shape, read_safetensors
from jaxlora.errors import CheckpointError
from jaxlora.models.config import ModelConfig
from jaxlora.models.families import Source, family_of, key_map
from jaxlora.models.lora import LoRAConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_KEY = "jaxlora_lora"  # safetensors metadata: our LoRAConfig as JSON
PREFIX = "base_model.model."
ADAPTER = ("adapter",)  # where a site's adapter params sit below its path
_ATTN_TARGETS = {"q": "query", "k": "key", "v": "value", "proj": "projection"}


@dataclasses.dataclass(frozen=True)
class Site:
    """One of our `Linear` layers and the HF module holding its kernel."""

    path: tuple[str, ...]  # e.g. ("blocks", "attn", "q"); its LoRA params are path + ADAPTER + ("lora_a" | "lora_b")
    target: str  # the LoRAConfig switch that adapts it
    kernel: Source
    layered: bool  # a block layer: params stacked [n_layer, ...], module name has "{i}"

    @property
    def dotted(self) -> str:
        """The module path `LoRAConfig` matches ("blocks.attn.q")."""
        return ".".join(self.path)

    def rank(self, lora: LoRAConfig) -> int:
        return lora.rank_at(self.dotted, self.target)

    @property
    def module(self) -> str:
        return self.kernel.names[0].removesuffix(".weight")

    def module_at(self, layer: int | None) -> str:
        return self.module.format(i=layer) if self.layered else self.module


def lora_sites(config: ModelConfig) -> list[Site]:
    """Every layer of `config`'s GPT that can carry a LoRA adapter, in key-map order."""
    top, block = key_map(config)
    sites = []

    def walk(node: dict, path: tuple, layered: bool):
        for key, value in node.items():
            if isinstance(value, dict) and isinstance(value.get("kernel"), Source):
                p = path + (key,)
                target = "head" if p == ("lm_head",) else "mlp" if "mlp" in p else _ATTN_TARGETS[key]
                sites.append(Site(p, target, value["kernel"], layered))
            elif isinstance(value, dict):
                walk(value, path + (key,), layered)

    walk(top, (), False)
    walk(block, ("blocks",), True)
    return sites


# ---------------------------------------------------------------------------------------------
# Export


def peft_tensors(config: ModelConfig, lora: LoRAConfig, params: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """Our LoRA params (nested dict, blocks stacked) -> (adapter_config fields, {PEFT key: fp32 array}).

    CheckpointError where PEFT's format cannot express the adapters.
    """
    if not lora.enabled:
        raise CheckpointError("the model has no LoRA adapters to export")
    modules: dict[str, list[tuple[Site, np.ndarray, np.ndarray]]] = {}
    experts = []  # (site, its adapter params) of the adapted expert layers: PEFT's target_parameters
    for site in lora_sites(config):
        node = _get(params, site.path + ADAPTER)
        if not site.rank(lora) or node is None:
            continue
        if site.kernel.experts:
            experts.append((site, node))
            continue
        modules.setdefault(site.module, []).append(
            (site, np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32),
             None if "magnitude" not in node else np.asarray(node["magnitude"], np.float32)))
    tensors, rank_pattern, alpha_pattern, targets = {}, {}, {}, {}
    for module, parts in modules.items():
        short = module.rsplit(".", 1)[-1]
        ranks = {s.rank(lora) for s, *_ in parts}
        if len(ranks) > 1:
            raise CheckpointError(f"the parts of the fused module {module} have different LoRA ranks "
                                  f"{sorted(ranks)}, which PEFT's format cannot express")
        r = ranks.pop() * len(parts)  # the PEFT module's rank; its scale stays the parts' scale
        if targets.setdefault(short, r) != r:
            raise CheckpointError(f"PEFT's rank_pattern cannot give the modules named {short} different ranks")
        alpha = lora.scale_for(r // len(parts)) * (math.sqrt(r) if lora.use_rslora else r)
        if r != lora.r:
            rank_pattern[short] = r
        if not math.isclose(alpha, lora.alpha, rel_tol=1e-12):
            alpha_pattern[short] = alpha
        site = parts[0][0]
        for i in range(config.n_layer) if site.layered else [None]:
            at = (i,) if site.layered else ()
            a, b = _fuse(config, [(s, a[at], b[at]) for s, a, b, _ in parts])
            name = PREFIX + site.module_at(i)
            tensors[name + ".lora_A.weight"], tensors[name + ".lora_B.weight"] = a, b
            if lora.use_dora:
                tensors[name + ".lora_magnitude_vector"] = _fuse_rows(config, [(s, m[at]) for s, _, _, m in parts])
    fields = dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_rslora=lora.use_rslora,
                  target_modules=_target_modules(config, sorted(targets), modules), rank_pattern=rank_pattern,
                  alpha_pattern=alpha_pattern)
    if experts:
        target_parameters, ranks, alphas, expert_tensors = peft_experts.export_experts(config, lora, experts)
        rank_pattern.update(ranks)
        alpha_pattern.update(alphas)
        tensors.update(expert_tensors)
        # PEFT refuses dropout on target_parameters; it only acts in training (our metadata keeps it)
        fields.update(target_parameters=target_parameters, lora_dropout=0.0)
        if lora.dropout:
            log.warning("the PEFT adapter's lora_dropout is 0 instead of %g: PEFT has no dropout for LoRA on "
                        "expert parameters (target_parameters)", lora.dropout)
    return fields, tensors


def _target_modules(config: ModelConfig, names: list[str], modules: dict) -> list[str] | str:
    """PEFT's target_modules: the module names, or, for a model that wraps the one jaxlora trains (Gemma 3's
    vision-language model), a regex over the exact modules adapted, so PEFT leaves the vision tower's
    like-named layers alone."""
    if family_of(config.model_type).unwrap is None:
        return names
    adapted = sorted({site.module for parts in modules.values() for site, *_ in parts})  # "{i}": the layer
    return "|".join(re.escape(m).replace(r"\{i\}", r"\d+") for m in adapted)


def _fuse(config: ModelConfig, parts: list[tuple[Site, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One module's PEFT (A [k r, in], B [out, k r]) from our parts' (a [in, r], b [r, out])."""
    site, a, b = parts[0]
    if site.kernel.part is None:
        return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
    r = a.shape[-1]
    rows = hf_shape(site.kernel, (a.shape[0], b.shape[1]), config)[0]
    big_a = np.ascontiguousarray(np.concatenate([p_a.T for _, p_a, _ in parts]))  # save_file writes raw buffers
    big_b = np.zeros((rows, len(parts) * r), np.float32)
    for j, (s, _, p_b) in enumerate(parts):
        big_b[fused_rows(np.arange(rows), s.kernel.part, config), j * r:(j + 1) * r] = p_b.T
    return big_a, big_b


def _fuse_rows(config: ModelConfig, parts: list[tuple[Site, np.ndarray]]) -> np.ndarray:
    """One module's per-output vector [out] (a DoRA magnitude) from our parts' [out_p]."""
    site, m = parts[0]
    if site.kernel.part is None:
        return np.ascontiguousarray(m)
    rows = hf_shape(site.kernel, (1, m.shape[-1]), config)[0]
    fused = np.zeros(rows, np.float32)
    for s, m in parts:
        fused[fused_rows(np.arange(rows), s.kernel.part, config)] = m
    return fused


def write_peft_adapter(config: ModelConfig, lora: LoRAConfig, params: dict, out_dir: str | os.PathLike, *,
                       base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_model.safetensors, then adapter_config.json (each atomically) into `out_dir`."""
    from safetensors.numpy import save_file

    fields, tensors = peft_tensors(config, lora, params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter_config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
                          bias="none", fan_in_fan_out=False, inference_mode=True, init_lora_weights=True,
                          modules_to_save=None, layers_to_transform=None, use_dora=lora.use_dora, **fields)
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", METADATA_KEY: json.dumps(dataclasses.asdict(lora))})
    os.replace(tmp, out / WEIGHTS_FILE)
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / CONFIG_FILE)
    return out


def save_peft_adapter(model, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Write `model`'s LoRA adapters (a jaxlora GPT) as a PEFT adapter directory; returns its path."""
    from flax import nnx

    params = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    return write_peft_adapter(model.config, model.lora, params, out_dir,
                              base_model_name_or_path=base_model_name_or_path)


# ---------------------------------------------------------------------------------------------
# Import


def read_peft_adapter(directory: str | os.PathLike, config: ModelConfig) -> tuple[LoRAConfig, dict]:
    """A PEFT LoRA adapter directory -> (LoRAConfig, our nested LoRA params as numpy, blocks stacked)."""
    directory = Path(directory)
    cfg = _read_adapter_config(directory / CONFIG_FILE)
    file = directory / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"no {WEIGHTS_FILE} in {directory} (only safetensors PEFT adapters can be loaded)")
    metadata, raw = read_safetensors(file)
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, w in raw.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_(?:([AB])(?:\.default)?\.weight|"
                         r"(magnitude)_vector(?:\.default)?(?:\.weight)?)", key)
        if m is None or (m[3] and not cfg.get("use_dora")):
            raise CheckpointError(f"{file} holds {key}, which is not a LoRA A/B weight (or, with use_dora, a DoRA "
                                  "magnitude) that jaxlora can load")
        modules.setdefault(m[1], {})[m[2] or "m"] = w.astype(np.float32)
    experts = peft_experts.take_experts(config, cfg, modules, file)  # (layer, param) -> {"A", "B"}
    sites = lora_sites(config)
    owners: dict[str, set[str]] = {}  # HF module name -> the targets of the sites it holds
    for s in sites:
        if s.kernel.experts:  # fused 3-D parameters in transformers 5: no PEFT module name
            continue
        for i in range(config.n_layer) if s.layered else [None]:
            owners.setdefault(s.module_at(i), set()).add(s.target)
    for name, ab in modules.items():
        if name not in owners:
            raise CheckpointError(f"{file} adapts module {name}, which jaxlora cannot adapt for model_type "
                                  f"{config.model_type!r}")
        wanted = {"A", "B"} | ({"m"} if cfg.get("use_dora") else set())
        if set(ab) != wanted:
            what = {"A": "lora_A weight", "B": "lora_B weight", "m": "lora_magnitude_vector"}[(wanted - set(ab)).pop()]
            raise CheckpointError(f"{file} has no {what} for module {name}")
    native = METADATA_KEY in metadata  # our own export: the rank blocks of fused modules follow our config
    if native:
        lora = LoRAConfig(**json.loads(metadata[METADATA_KEY]))
        adapted = {s.module_at(i) for s in sites if s.rank(lora) and not s.kernel.experts
                   for i in (range(config.n_layer) if s.layered else [None])}
        stray = [name for name in modules if name not in adapted]
        stray += peft_experts.stray_experts(config, lora, sites, experts)
        if stray:
            raise CheckpointError(f"{file} adapts {stray[0]}, which its jaxlora metadata does not switch on")
    else:
        ranks = {name: ab["A"].shape[0] for name, ab in modules.items()}
        ranks.update(peft_experts.expert_ranks(config, experts))
        lora = _lora_config(cfg, ranks, set().union(*(owners[name] for name in modules), {"mlp"} if experts else ()))
    shapes = lora_shapes(config, lora)
    params: dict = {}
    expert_shapes = {s.path: tuple(_get(shapes, s.path + ADAPTER)[k].shape for k in ("lora_a", "lora_b"))
                     for s in sites if s.kernel.experts and s.rank(lora)}
    expert_params, missing = peft_experts.import_experts(config, lora, sites, experts, expert_shapes, native=native,
                                                         where=file)
    for path, node in expert_params.items():
        _put(params, path + ADAPTER, node)
    for group in _group_by_module(sites, lora).values():
        layers = list(range(config.n_layer)) if group[0].layered else [None]
        per_layer = []
        for i in layers:
            ab = modules.get(group[0].module_at(i))
            if ab is None:
                missing.append(group[0].module_at(i))
                per_layer.append([None] * len(group))
            else:
                first = _get(shapes, group[0].path + ADAPTER)
                kernel_shape = (first["lora_a"].shape[-2], first["lora_b"].shape[-1])  # [in, out] of one layer
                per_layer.append(_split(config, group, ab, lora, kernel_shape, native=native,
                                        where=f"{file}: {group[0].module_at(i)}"))
        for j, site in enumerate(group):
            node = {}
            if lora.use_dora:
                rows = [None if pl[j] is None else pl[j][2] for pl in per_layer]
                shape = _get(shapes, site.path + ADAPTER)["magnitude"].shape[1 if site.layered else 0:]
                arrays = [np.ones(shape, np.float32) if m is None else m for m in rows]
                node["magnitude"] = np.stack(arrays) if site.layered else arrays[0]
            for n, key in enumerate(("lora_a", "lora_b")):
                shape = _get(shapes, site.path + ADAPTER)[key].shape[1 if site.layered else 0:]
                arrays = [np.zeros(shape, np.float32) if pl[j] is None else pl[j][n] for pl in per_layer]
                node[key] = np.stack(arrays) if site.layered else arrays[0]
            _put(params, site.path + ADAPTER, node)
    if missing:
        log.warning("the PEFT adapter in %s does not adapt %s; they get zero (no-op) adapters because jaxlora "
                    "switches LoRA on per target for all layers", directory, ", ".join(missing))
    return lora, params


def lora_shapes(config: ModelConfig, lora: LoRAConfig) -> dict:
    """Our LoRA params' shapes for `config` and `lora` (nested dict of ShapeDtypeStructs), built abstractly."""
    from flax import nnx

    from jaxlora.models.gpt import GPT

    model = nnx.eval_shape(lambda: GPT(config, lora, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))


def _get(tree: dict, path: tuple):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _put(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _read_adapter_config(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in {path.parent}")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    unsupported = [(cfg.get("peft_type", "LORA") != "LORA", f"peft_type {cfg.get('peft_type')!r} (only LORA)"),
                   (cfg.get("bias", "none") != "none", "trained biases"),
                   (cfg.get("lora_bias"), "lora_bias"), (cfg.get("modules_to_save"), "modules_to_save"),
                   (cfg.get("fan_in_fan_out"), "fan_in_fan_out")]
    for bad, what in unsupported:
        if bad:
            raise CheckpointError(f"{path} uses {what}, which jaxlora's LoRA cannot represent")
    return cfg


def _lora_config(cfg: dict, ranks: dict[str, int], on: set[str]) -> LoRAConfig:
    """The single (r, alpha) of a foreign PEFT adapter (ranks: module or parameter name -> its LoRA rank);
    CheckpointError when its modules disagree."""
    pairs = {}
    for name, rank in ranks.items():
        alpha = cfg.get("lora_alpha", 8)
        for key, value in (cfg.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({key})$", name):
                alpha = value
                break
        pairs.setdefault((rank, float(alpha)), name)
    if len(pairs) > 1:
        shown = "; ".join(f"{m}: r={r}, alpha={a:g}" for (r, a), m in sorted(pairs.items()))
        raise CheckpointError(f"the PEFT adapter uses several ranks or alphas ({shown}), but a jaxlora model has one")
    (r, alpha), = pairs
    return LoRAConfig(r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)),
                      use_rslora=bool(cfg.get("use_rslora", False)), use_dora=bool(cfg.get("use_dora", False)),
                      **{t: True for t in on})


def _group_by_module(sites: list[Site], lora: LoRAConfig) -> dict[str, list[Site]]:
    """The adapted sites by HF module (several for a fused module)."""
    groups: dict[str, list[Site]] = {}
    for site in sites:
        if site.rank(lora) and not site.kernel.experts:  # experts: `peft_experts`
            groups.setdefault(site.module, []).append(site)
    return groups


def _split(config: ModelConfig, group: list[Site], ab: dict, lora: LoRAConfig, kernel_shape: tuple[int, int], *,
           native: bool, where: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """One module's PEFT (A [k r, in], B [out, k r], DoRA magnitude [out]) -> each part's (a [in, r], b [r, out],
    magnitude [out_p] or None).

    kernel_shape: our [in, out] of the group's first part. native (our own export): part j owns
    rank block j; otherwise every part shares A (k = 1).
    """
    r = group[0].rank(lora)
    kernel = group[0].kernel
    big_a, big_b = ab["A"], ab["B"]
    k = len(group) if native and kernel.part is not None else 1
    expected = ((k * r, kernel_shape[0]), (hf_shape(kernel, kernel_shape, config)[0], k * r))
    if (big_a.shape, big_b.shape) != expected:
        raise CheckpointError(f"{where} has lora_A/lora_B shapes {list(big_a.shape)}/{list(big_b.shape)} but the "
                              f"base checkpoint and rank imply {list(expected[0])}/{list(expected[1])}")
    m = ab.get("m")  # DoRA magnitude [out] or None
    if m is not None and m.shape != (big_b.shape[0],):
        raise CheckpointError(f"{where} has a lora_magnitude_vector of shape {list(m.shape)}, not [{big_b.shape[0]}]")
    if kernel.part is None:
        return [(big_a.T, big_b.T, m)]
    rows = np.arange(big_b.shape[0])
    out = []
    for j, site in enumerate(group):
        b = big_b[fused_rows(rows, site.kernel.part, config)]
        cols = slice(j * r, (j + 1) * r)
        if k > 1 and (np.any(b[:, :j * r]) or np.any(b[:, (j + 1) * r:])):
            raise CheckpointError(f"{where} is not block-structured as its jaxlora metadata says")
        part_m = None if m is None else m[fused_rows(rows, site.kernel.part, config)]
        out.append((big_a[cols].T, b[:, cols].T, part_m) if k > 1 else (big_a.T, b.T, part_m))
    return out
