"""The family registry: every model family jaxlora implements, looked up by HF `model_type`.

Adding a family: write `families/<name>.py` declaring `FAMILY = base.Family(...)` (found by its
file). Everything else (config.json both ways, loading, HF export, PEFT sites, presets) reads the
family from here.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from jaxlora.errors import CheckpointError
from jaxlora.models.config import ModelConfig
from jaxlora.models.families.base import Family, KeyMap, Source, common_fields, common_hf

# every module of this package but `base` is a family (declaring FAMILY, or FAMILIES)
_MODULES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"))

FAMILIES: dict[str, Family] = {}  # HF model_type -> its family
PRESETS: dict[str, ModelConfig] = {}  # LitGPT-style model name -> ModelConfig
for _name in _MODULES:
    _module = importlib.import_module(f"{__name__}.{_name}")
    for _family in getattr(_module, "FAMILIES", None) or (_module.FAMILY,):
        for _t in _family.model_types:
            FAMILIES[_t] = _family
        for _preset in _family.presets:
            PRESETS[_preset.name] = _preset

SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))


def family_of(model_type: str | None) -> Family:
    """The family that reads HF `model_type`; CheckpointError naming the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise CheckpointError(f"unsupported model_type {model_type!r} in config.json; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return FAMILIES[model_type]


def config_from_hf(hf: dict) -> ModelConfig:
    """An HF config.json dict -> ModelConfig (CheckpointError for anything jaxlora does not implement)."""
    family = family_of(hf.get("model_type"))
    if family.unwrap is not None:
        hf = family.unwrap(hf)
    try:
        config = ModelConfig(**common_fields(hf, tie_default=family.tie_default), **family.from_hf(hf))
    except KeyError as e:
        raise CheckpointError(f"config.json of model_type {hf['model_type']!r} has no {e.args[0]!r} field") from None
    except (TypeError, ValueError) as e:  # a field of the wrong type (e.g. null where a size belongs)
        raise CheckpointError(f"config.json of model_type {hf['model_type']!r} has a field of the wrong type or "
                              f"value ({e})") from None
    sizes = {f: getattr(config, f) for f in ("vocab_size", "n_layer", "n_embd", "n_head", "n_query_groups",
                                             "intermediate_size", "head_size", "block_size")}
    bad = [f"{f}={v!r}" for f, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise CheckpointError(f"config.json of model_type {hf['model_type']!r} gives sizes that are not positive "
                              f"integers: {', '.join(bad)}")
    return config


def hf_config_dict(config: ModelConfig, dtype: str = "float32") -> dict:
    """The `config.json` of `config` for transformers; dtype: the stored weights' dtype name.

    Written in the long-standing key format of Hub checkpoints (`rope_theta`, `rope_scaling`,
    `torch_dtype`), which transformers 4 and 5 both read; `config_from_hf` of it gives back `config`.
    """
    family = family_of(config.model_type)
    hf = {**common_hf(config, family, dtype), **family.to_hf(config)}
    check_hf_config(config, hf, f"the {config.model_type} config.json that jaxlora can write")
    return hf


def check_hf_config(c: ModelConfig, hf: dict, what: str = "the given config.json") -> None:
    """CheckpointError unless `hf` describes `c` (its name, and vocab_size below the padded size, aside)."""
    back = config_from_hf(hf)
    diff = [f.name for f in dataclasses.fields(c)
            if f.name not in ("name", "vocab_size") and getattr(back, f.name) != getattr(c, f.name)]
    if diff:
        raise CheckpointError(f"{what} does not describe this model: it differs in {', '.join(diff)}")


def export_config(config: ModelConfig) -> ModelConfig:
    """The config an HF export of `config` writes: itself, or the wrapped model's (Gemma 3's text model)."""
    family = family_of(config.model_type)
    return config.replace(model_type=family.export_as) if family.export_as else config


def ignored_tensors(config: ModelConfig) -> str | None:
    """Regex of the checkpoint tensors `config`'s family leaves out on purpose (None: none)."""
    return family_of(config.model_type).ignored


def key_map(config: ModelConfig) -> KeyMap:
    """-> (top-level sources, per-block sources) of `config`'s family (see `base.Source`)."""
    return family_of(config.model_type).key_map(config)


__all__ = ["FAMILIES", "PRESETS", "SUPPORTED_MODEL_TYPES", "Family", "Source", "family_of", "config_from_hf",
           "hf_config_dict", "check_hf_config", "export_config", "ignored_tensors", "key_map"]
