"""LoRA on the experts of a mixture-of-experts MLP in PEFT's format (`target_parameters`), both ways.

transformers 5 keeps a sparse MLP's experts as two fused 3-D parameters of one module,
`model.layers.{i}.mlp.experts` (Mixtral, Qwen3-MoE): `gate_up_proj` [E, 2f, d] (each expert's gate rows,
then its up rows: `linear(x, gate_up_proj[e]).chunk(2)`) and `down_proj` [E, d, f], each expert's [out, in].
PEFT (>= 0.17) adapts such a parameter with `LoraConfig(target_parameters=[...])` (`lora.ParamWrapper`):

    lora_A.weight [E*r, in]   expert e's A_e [r, in] is rows e*r .. e*r + r - 1     (A.reshape(E, r, in))
    lora_B.weight [out, r*E]  expert e's B_e [out, r] is columns k*E + e, k < r     (B.reshape(out, r, E))
    delta_e = B_e A_e * lora_alpha / r (or / sqrt(r) with rsLoRA)

with r and lora_alpha looked up in rank_pattern / alpha_pattern by the parameter's name
("model.layers.{i}.mlp.experts.gate_up_proj"). Every expert has its own A_e and B_e, so our per-expert adapters
(a [E, in, r], b [E, r, out], kernel [E, in, out]) map exactly: A_e = a[e].T, B_e = b[e].T.

Both parameters of one module adapted: PEFT nests one wrapper in the other in the module's parameter order
(gate_up_proj, down_proj), the first innermost, and its keys say so: `...mlp.experts.base_layer.lora_A.weight` is
gate_up_proj's, `...mlp.experts.lora_A.weight` down_proj's (the only one's, when one is adapted).

Our gate (fc_1) and up (fc_2) adapters are independent; in gate_up_proj they become one adapter of rank k*r per
expert (k adapted halves): A_e = [a_gate[e].T; a_up[e].T], B_e block-diagonal (the gate rows hold b_gate[e].T in
rank block 0, the up rows b_up[e].T in block 1), so B_e A_e is both deltas exactly; alpha_pattern keeps the scale
(alpha * k, or alpha * sqrt(k) with rsLoRA) and our LoRAConfig in the file's metadata splits it back into rank-r
adapters. A PEFT-trained gate_up_proj adapter of rank r (dense per expert) loads as rank-r gate and up adapters
sharing A_e, each with its rows of B_e: also exact.

PEFT's ParamWrapper has neither DoRA nor dropout: DoRA on experts is refused; the exported lora_dropout is 0
(dropout only acts in training; the metadata keeps ours).
"""

from __future__ import annotations

import math

import numpy as np

from jaxlora.errors import CheckpointError

# model_type -> the transformers 5 module holding the experts' fused parameters ("{i}": the layer)
EXPERTS_MODULE = {"mixtral": "model.layers.{i}.mlp.experts", "qwen3_moe": "model.layers.{i}.mlp.experts"}
# the fused parameters in the module's definition order (PEFT's nesting order) -> our layers, by row block
PARAMS = {"gate_up_proj": ("fc_1", "fc_2"), "down_proj": ("proj",)}
_PLACE = {ours: (param, block) for param, layers in PARAMS.items() for block, ours in enumerate(layers)}


def _module(config) -> str:
    module = EXPERTS_MODULE.get(config.model_type)
    if module is None:
        raise CheckpointError(f"jaxlora does not know where transformers keeps the experts of model_type "
                              f"{config.model_type!r}, so their LoRA cannot be written in PEFT's format")
    return module


def target_name(config, param: str) -> str:
    """The `target_parameters` entry (and rank/alpha pattern key) of one fused parameter: "mlp.experts.down_proj"."""
    return _module(config).split("{i}.", 1)[-1] + "." + param


def _keys(module: str, adapted: list[str]) -> dict[str, str]:
    """param -> the name PEFT saves its lora_A / lora_B under (before ".lora_A.weight"), given the adapted params of
    one experts module in definition order (the first is nested deepest)."""
    return {p: module + ".base_layer" * (len(adapted) - 1 - n) for n, p in enumerate(adapted)}


# ---------------------------------------------------------------------------------------------
# Export


def export_experts(config, lora, adapted: list[tuple]) -> tuple[list[str], dict, dict, dict[str, np.ndarray]]:
    """Our expert adapters -> (target_parameters, rank_pattern, alpha_pattern entries, {PEFT key: fp32 array}).

    adapted: (site, its adapter params: lora_a [n_layer, E, in, r], lora_b [n_layer, E, r, out]) of every adapted
    expert layer.
    """
    if lora.use_dora:
        raise CheckpointError("DoRA on the experts of a mixture-of-experts model cannot be expressed in PEFT's "
                              "format (PEFT adapts fused expert parameters with plain LoRA only); train without "
                              "use_dora or without lora_mlp to export to PEFT")
    module = _module(config)
    by_param: dict[str, list] = {}
    for site, node in adapted:
        param, block = _PLACE[site.path[-1]]
        a, b = (np.asarray(node[k], np.float32) for k in ("lora_a", "lora_b"))
        by_param.setdefault(param, []).append((block, site, a, b))
    order = [p for p in PARAMS if p in by_param]
    targets, rank_pattern, alpha_pattern, tensors = [], {}, {}, {}
    for param in order:
        parts = sorted(by_param[param], key=lambda x: x[0])
        ranks = {site.rank(lora) for _, site, _, _ in parts}
        if len(ranks) > 1:
            raise CheckpointError(f"the gate and up experts (fused {param} in transformers) have different LoRA "
                                  f"ranks {sorted(ranks)}, which PEFT's format cannot express")
        r = ranks.pop()
        rank = r * len(parts)  # the PEFT parameter's rank; its scale stays the parts' scale
        alpha = lora.scale_for(r) * (math.sqrt(rank) if lora.use_rslora else rank)
        name = target_name(config, param)
        targets.append(name)
        if rank != lora.r:
            rank_pattern[name] = rank
        if not math.isclose(alpha, lora.alpha, rel_tol=1e-12):
            alpha_pattern[name] = alpha
    for i in range(config.n_layer):
        keys = _keys(module.format(i=i), order)
        for param in order:
            parts = sorted(by_param[param], key=lambda x: x[0])
            big_a, big_b = _fuse([(block, a[i], b[i]) for block, _, a, b in parts], len(PARAMS[param]))
            tensors["base_model.model." + keys[param] + ".lora_A.weight"] = big_a
            tensors["base_model.model." + keys[param] + ".lora_B.weight"] = big_b
    return targets, rank_pattern, alpha_pattern, tensors


def _fuse(parts: list[tuple[int, np.ndarray, np.ndarray]], blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """One layer's PEFT (A [E*k*r, in], B [out, k*r*E]) from our parts' (row block, a [E, in, r], b [E, r, out_p])."""
    n_expert, n_in, r = parts[0][1].shape
    rows = parts[0][2].shape[-1]  # each row block's height
    rank = len(parts) * r
    a = np.concatenate([np.swapaxes(p_a, 1, 2) for _, p_a, _ in parts], axis=1)  # [E, k r, in]
    b = np.zeros((n_expert, blocks * rows, rank), np.float32)  # [E, out, k r]
    for j, (block, _, p_b) in enumerate(parts):
        b[:, block * rows:(block + 1) * rows, j * r:(j + 1) * r] = np.swapaxes(p_b, 1, 2)
    # save_file writes raw buffers: contiguous copies
    return (np.ascontiguousarray(a.reshape(n_expert * rank, n_in), np.float32),
            np.ascontiguousarray(b.transpose(1, 2, 0).reshape(blocks * rows, rank * n_expert), np.float32))


# ---------------------------------------------------------------------------------------------
# Import


def _targeted(targets: list[str], name: str) -> bool:
    """PEFT's matching of target_parameters against a parameter's full name."""
    return any(name == t or name.endswith("." + t) for t in targets)


def take_experts(config, cfg: dict, modules: dict[str, dict], where) -> dict[tuple[int, str], dict]:
    """Remove the expert parameters' entries from `modules` (HF module name -> {"A", "B"}) of an adapter with
    adapter_config `cfg`; -> {(layer, param): {"A": [E*r, in], "B": [out, r*E]}}."""
    targets = list(cfg.get("target_parameters") or [])
    module = EXPERTS_MODULE.get(config.model_type)
    if not targets:
        return {}
    names = ([] if module is None else
             [f"{module.format(i=i)}.{p}" for i in range(config.n_layer) for p in PARAMS])
    unknown = [t for t in targets if not any(_targeted([t], n) for n in names)]
    if unknown:
        raise CheckpointError(f"{where} targets the parameter {unknown[0]}, which jaxlora cannot adapt for model_type "
                              f"{config.model_type!r} (only its experts' fused gate_up_proj and down_proj)")
    if cfg.get("use_dora"):
        raise CheckpointError(f"{where} uses DoRA with target_parameters, which PEFT does not implement")
    out = {}
    for i in range(config.n_layer):
        m = module.format(i=i)
        keys = _keys(m, [p for p in PARAMS if _targeted(targets, f"{m}.{p}")])
        for param, key in keys.items():
            if key in modules:
                ab = modules.pop(key)
                if set(ab) != {"A", "B"}:
                    raise CheckpointError(f"{where} does not hold exactly one lora_A and one lora_B weight for the "
                                          f"parameter {m}.{param}")
                out[(i, param)] = ab
    return out


def expert_ranks(config, entries: dict) -> dict[str, int]:
    """The LoRA rank of each expert parameter entry (its lora_A holds E ranks), by its full name."""
    module = EXPERTS_MODULE.get(config.model_type, "")
    return {f"{module.format(i=i)}.{p}": ab["A"].shape[0] // config.n_expert for (i, p), ab in entries.items()}


def stray_experts(config, lora, sites, entries: dict) -> list[str]:
    """The expert parameters an adapter holds that `lora` (its jaxlora metadata) does not switch on."""
    on = {_PLACE[s.path[-1]][0] for s in sites if s.kernel.experts and s.rank(lora)}
    module = EXPERTS_MODULE.get(config.model_type, "")
    return [f"{module.format(i=i)}.{p}" for i, p in entries if p not in on]


def import_experts(config, lora, sites, entries: dict, shapes: dict, *, native: bool,
                   where) -> tuple[dict[tuple, dict], list[str]]:
    """The expert entries (`take_experts`) -> ({site path: {"lora_a", "lora_b"} stacked over layers}, the expert
    parameters the adapter leaves out, which get zero adapters).

    shapes: site path -> (lora_a shape [n_layer, E, in, r], lora_b shape [n_layer, E, r, out]).
    native (our own export): gate and up own rank blocks 0 and 1 of gate_up_proj; otherwise they share A.
    """
    by_param: dict[str, list] = {}
    for site in sites:
        if site.kernel.experts and site.rank(lora):
            param, block = _PLACE[site.path[-1]]
            by_param.setdefault(param, []).append((block, site))
    out, missing = {}, []
    module = EXPERTS_MODULE.get(config.model_type, "")
    for param, parts in by_param.items():
        parts.sort(key=lambda x: x[0])
        per_layer = []
        for i in range(config.n_layer):
            ab = entries.get((i, param))
            if ab is None:
                missing.append(f"{module.format(i=i)}.{param}")
                per_layer.append(None)
            else:
                per_layer.append(_split(ab, parts, lora, shapes, len(PARAMS[param]), native=native,
                                        where=f"{where}: {module.format(i=i)}.{param}"))
        for j, (_, site) in enumerate(parts):
            node = {}
            for n, key in enumerate(("lora_a", "lora_b")):
                shape = shapes[site.path][n][1:]
                node[key] = np.stack([np.zeros(shape, np.float32) if pl is None else pl[j][n] for pl in per_layer])
            out[site.path] = node
    return out, missing


def _split(ab: dict, parts: list[tuple[int, object]], lora, shapes: dict, blocks: int, *, native: bool,
           where: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """One layer's PEFT (A [E*k*r, in], B [out, k*r*E]) -> each part's (a [E, in, r], b [E, r, out_p])."""
    a_shape, b_shape = shapes[parts[0][1].path]
    n_expert, n_in, r = a_shape[1:]
    rows = b_shape[-1]
    k = len(parts) if native else 1
    rank = k * r
    big_a, big_b = ab["A"], ab["B"]
    expected = ((n_expert * rank, n_in), (blocks * rows, rank * n_expert))
    if (big_a.shape, big_b.shape) != expected:
        raise CheckpointError(f"{where} has lora_A/lora_B shapes {list(big_a.shape)}/{list(big_b.shape)} but the "
                              f"base checkpoint ({n_expert} experts) and rank imply {list(expected[0])}/"
                              f"{list(expected[1])}")
    a = big_a.reshape(n_expert, rank, n_in)  # [E, k r, in]
    b = big_b.reshape(blocks * rows, rank, n_expert).transpose(2, 0, 1)  # [E, out, k r]
    out = []
    for j, (block, _) in enumerate(parts):
        cols = slice(j * r, (j + 1) * r) if k > 1 else slice(0, r)
        part_b = b[:, block * rows:(block + 1) * rows]
        if k > 1 and (np.any(part_b[:, :, :j * r]) or np.any(part_b[:, :, (j + 1) * r:])):
            raise CheckpointError(f"{where} is not block-structured as its jaxlora metadata says")
        out.append((np.ascontiguousarray(np.swapaxes(a[:, cols], 1, 2)),
                    np.ascontiguousarray(np.swapaxes(part_b[:, :, cols], 1, 2))))
    return out
