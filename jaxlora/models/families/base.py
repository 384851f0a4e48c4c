"""What a model family declares (`Family`), and the pieces families share.

A family is one module under `jaxlora/models/families/` that gives the HF `model_type`s it reads,
config.json -> `ModelConfig` and back, the tensor key map (loading, HF export and PEFT sites all
derive from it) and its presets. Architectural variation lives in `ModelConfig` fields that the
shared blocks of `models/gpt.py` implement; a family only says which ones it uses.

The key map: our nested param dict (block params without the layer axis) -> `Source`, the place of
each parameter in the HF checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jaxlora.errors import CheckpointError
from jaxlora.models import rope
from jaxlora.models.config import ModelConfig

KeyMap = tuple[dict, dict]  # (top-level sources, per-block sources)


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one of our parameters lives in an HF checkpoint.

    names: candidate tensor names (first found wins), "{i}" = layer, "{e}" = expert. names[0] is the
    transformers module's own name (PEFT's key), names[-1] the name `save_pretrained` writes; they
    differ only where transformers serialises a legacy name (GPT-NeoX's head: lm_head / embed_out).
    part: None, ("qkv", "q"|"k"|"v", layout) to cut a fused attention tensor, or ("halves", 0|1)
    to cut a fused gate/up tensor. transpose: HF [out, in] -> our [in, out].
    """

    names: tuple[str, ...]
    transpose: bool = False
    part: tuple | None = None
    experts: int = 0  # > 0: stack tensors "{e}" = 0..experts-1 on a leading axis


def linear(*names: str, part=None) -> dict[str, Source]:
    """kernel (+ bias) entries of one linear layer stored as HF `<name>.weight` / `<name>.bias`."""
    return {"kernel": Source(tuple(n + ".weight" for n in names), transpose=True, part=part),
            "bias": Source(tuple(n + ".bias" for n in names), part=part)}


def norm(name: str) -> dict[str, Source]:
    return {"weight": Source((name + ".weight",)), "bias": Source((name + ".bias",))}


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family. model_types[0] is the `model_type` written to an exported config.json."""

    model_types: tuple[str, ...]
    architecture: str  # config.json `architectures[0]` (the transformers class)
    from_hf: Callable[[dict], dict]  # config.json -> ModelConfig fields beyond `common_fields`
    to_hf: Callable[[ModelConfig], dict]  # ModelConfig -> config.json keys beyond `common_hf`
    key_map: Callable[[ModelConfig], KeyMap]
    presets: tuple[ModelConfig, ...] = ()
    tie_default: bool = False  # the head is tied when config.json has no tie_word_embeddings
    # A model that wraps the one jaxlora trains (Gemma 3's vision-language model around its text model):
    unwrap: Callable[[dict], dict] | None = None  # its config.json -> the config dict of the wrapped model
    ignored: str | None = None  # regex of checkpoint tensors left out on purpose (e.g. the vision tower)
    export_as: str | None = None  # the model_type an HF export writes (the wrapped model alone)


# ---------------------------------------------------------------------------------------------
# config.json reading and writing shared by every family


def require(hf: dict, key: str, allowed: tuple, default: Any, family: str) -> Any:
    """hf[key] (or `default`), refused in one sentence unless it is one of `allowed`."""
    value = hf.get(key, default)
    if value is None:
        value = default
    if value not in allowed:
        raise CheckpointError(f"unsupported {family} config.json field {key}={value!r}: jaxlora implements "
                              f"{', '.join(map(repr, allowed))}")
    return value


def refuse_true(hf: dict, family: str, *keys: str) -> None:
    """Refuse switches jaxlora does not implement when they are set."""
    for key in keys:
        if hf.get(key):
            raise CheckpointError(f"unsupported {family} config.json field {key}={hf[key]!r}: jaxlora does not "
                                  "implement it")


def rope_parameters(hf: dict) -> dict:
    """transformers 5's `rope_parameters` merged over the legacy `rope_theta` / `rope_scaling` keys."""
    return {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}


def rope_base(hf: dict, default: float = 10000.0) -> float:
    """The RoPE base; a rope_theta inside the rope dict wins over the top-level one, as in transformers."""
    return float(rope_parameters(hf).get("rope_theta") or hf.get("rope_theta") or default)


def partial_rotary(hf: dict, default: float, legacy: str = "partial_rotary_factor") -> float:
    """The rotated fraction of each head: the rope dict's (which wins in transformers), else the top-level
    `legacy` key (GPT-NeoX: rotary_pct), else `default` (the family's config class default)."""
    value = rope_parameters(hf).get("partial_rotary_factor")
    return float(hf.get(legacy, default) if value is None else value)


def rope_scaling(hf: dict, family: str) -> tuple | None:
    """The RoPE scaling of config.json as `ModelConfig.rope_scaling` (None: none); CheckpointError, naming the
    field, for a rope type or parameter that `models.rope` does not implement exactly."""
    return rope.parse_rope_scaling(rope_parameters(hf) or None,
                                   max_position_embeddings=hf.get("max_position_embeddings") or 4096,
                                   original_max_position_embeddings=hf.get("original_max_position_embeddings"))


def rope_scaling_hf(c: ModelConfig) -> dict:
    """config.json's `rope_scaling` entry of `c` ({} when there is none), with its original context length
    also at the top level, where transformers looks first (and Phi-3's config class has a default)."""
    if not c.rope_scaling:
        return {}
    scaling = rope.rope_scaling_to_hf(c.rope_scaling)
    original = scaling.get("original_max_position_embeddings")
    return {"rope_scaling": scaling, **({} if original is None else {"original_max_position_embeddings": original})}


def common_fields(hf: dict, *, tie_default: bool = False) -> dict:
    """The ModelConfig fields every family reads the same way (name, vocab, tied head)."""
    name = str(hf.get("_name_or_path") or hf.get("model_type"))
    vocab = hf["vocab_size"]
    return dict(name=name.rstrip("/").rsplit("/", 1)[-1], model_type=hf["model_type"], vocab_size=vocab,
                padded_vocab_size=vocab, tie_embeddings=bool(hf.get("tie_word_embeddings", tie_default)))


def common_hf(c: ModelConfig, family: Family, dtype: str) -> dict:
    """The config.json keys every family writes the same way."""
    return dict(architectures=[family.architecture], model_type=c.model_type, vocab_size=c.padded_vocab_size,
                hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                max_position_embeddings=c.block_size, tie_word_embeddings=c.tie_embeddings, rope_theta=c.rope_base,
                torch_dtype=dtype,
                # unknown to a ModelConfig: null, not the config class defaults (which may lie outside the vocab)
                bos_token_id=None, eos_token_id=None, pad_token_id=None)


def gelu_approximate(act: str, family: str) -> bool:
    """HF activation name of a GELU MLP -> whether it is the tanh approximation."""
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return True
    if act == "gelu":
        return False
    raise CheckpointError(f"unsupported {family} activation {act!r}; jaxlora implements gelu, gelu_new, "
                          "gelu_pytorch_tanh and gelu_fast")


# ---------------------------------------------------------------------------------------------
# Llama-like families: model.layers.{i}.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, RMSNorm


def llama_fields(hf: dict, family: str, *, eps_default: float = 1e-5) -> dict:
    """The ModelConfig fields of a Llama-like config.json (silu-gated MLP, RMSNorm, RoPE)."""
    require(hf, "hidden_act", ("silu",), "silu", family)
    n_head = hf["num_attention_heads"]
    return dict(
        n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"], n_head=n_head,
        n_query_groups=hf.get("num_key_value_heads") or n_head,
        head_size=hf.get("head_dim") or hf["hidden_size"] // n_head,
        intermediate_size=hf["intermediate_size"], block_size=hf.get("max_position_embeddings", 4096),
        norm_eps=hf.get("rms_norm_eps", eps_default), rope_base=rope_base(hf),
        rope_scaling=rope_scaling(hf, family),
        rotary_percentage=partial_rotary(hf, 1.0),
    )


def llama_hf(c: ModelConfig) -> dict:
    """The config.json keys of a Llama-like ModelConfig."""
    partial = {} if c.rotary_percentage == 1.0 else {"partial_rotary_factor": c.rotary_percentage}
    return dict(num_key_value_heads=c.n_query_groups, head_dim=c.head_size, intermediate_size=c.intermediate_size,
                hidden_act="silu", rms_norm_eps=c.norm_eps, **partial, **rope_scaling_hf(c))


def llama_keys(c: ModelConfig, *, attn: dict | None = None, mlp: dict | None = None) -> KeyMap:
    """The key map of a Llama-like checkpoint; attn / mlp replace the per-block attention / MLP sources."""
    p = "model.layers.{i}."
    if attn is None:
        attn = {x: linear(p + f"self_attn.{x}_proj") for x in "qkv"}
        attn["proj"] = linear(p + "self_attn.o_proj")
    if mlp is None:
        mlp = {"fc_1": linear(p + "mlp.gate_proj"), "fc_2": linear(p + "mlp.up_proj"),
               "proj": linear(p + "mlp.down_proj")}
    block = {"norm_1": norm(p + "input_layernorm"), "attn": attn, "mlp": mlp,
             "norm_2": norm(p + "post_attention_layernorm")}
    top = {"wte": Source(("model.embed_tokens.weight",)), "ln_f": norm("model.norm"), "lm_head": linear("lm_head")}
    return top, block


_LAYER_TYPES = {"full_attention": "global", "sliding_attention": "sliding"}


def attention_layout(hf: dict, n_layer: int, block_size: int, family: str, *, window: int | None,
                     sliding: list[bool] | None = None) -> dict:
    """sliding_window_size and attention_types from config.json's `layer_types` (transformers 5 writes
    it), else from `sliding` (the family's own rule: which layers slide when there is a window).
    window: the sliding window when the family's switches turn it on, else None."""
    names = hf.get("layer_types")
    if names is not None:
        unknown = sorted(set(names) - set(_LAYER_TYPES))
        if unknown or len(names) != n_layer:
            raise CheckpointError(f"unsupported {family} config.json layer_types {unknown or names}: jaxlora "
                                  f"implements {n_layer} entries of full_attention / sliding_attention")
        types = [_LAYER_TYPES[n] for n in names]
    else:
        types = ["sliding" if s else "global" for s in (sliding or [True] * n_layer)]
    if not window or "sliding" not in types:
        return {}
    if all(t == "sliding" for t in types):  # a window as long as the context is no window
        return {} if window >= block_size else {"sliding_window_size": int(window)}
    # mixed layers stay typed even with a window as long as the context: Gemma 3's sliding layers have their own RoPE
    return {"sliding_window_size": int(window), "attention_types": tuple(types)}


def qwen_attention_layout(hf: dict, n_layer: int, block_size: int, family: str) -> dict:
    """Qwen2 / Qwen3: with use_sliding_window, the layers from max_window_layers on slide (transformers)."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    first = hf.get("max_window_layers", 28)
    return attention_layout(hf, n_layer, block_size, family, window=window,
                            sliding=[i >= first for i in range(n_layer)])


def qwen_attention_hf(c: ModelConfig) -> dict:
    return dict(use_sliding_window=c.sliding_window_size is not None, sliding_window=c.sliding_window_size,
                max_window_layers=0, layer_types=layer_types_hf(c))


def layer_types_hf(c: ModelConfig) -> list[str]:
    """config.json's `layer_types` of `c`."""
    return ["sliding_attention" if c.attention_type(i) == "sliding" else "full_attention" for i in range(c.n_layer)]


def expert_mlp(c: ModelConfig, moe: str, gate: str, up: str, down: str) -> dict:
    """The sources of a sparse MLP stored per expert: `model.layers.{i}.<moe>.experts.{e}.<gate|up|down>.weight`
    (stacked on our leading expert axis) and its router `<moe>.gate.weight`."""
    e = f"model.layers.{{i}}.{moe}.experts.{{e}}."
    expert = lambda name: {"kernel": Source((e + name + ".weight",), True, experts=c.n_expert)}  # noqa: E731
    return {"fc_1": expert(gate), "fc_2": expert(up), "proj": expert(down),
            "router": Source((f"model.layers.{{i}}.{moe}.gate.weight",), transpose=True)}


def every_layer_window(hf: dict, fields: dict, family: str) -> dict:
    """The layout of families whose `sliding_window`, when set, applies to every layer (Mistral, Mixtral, Phi-3)."""
    return attention_layout(hf, fields["n_layer"], fields["block_size"], family, window=hf.get("sliding_window"))


def presets(model_type: str, rows: list[dict], **shared: Any) -> tuple[ModelConfig, ...]:
    """ModelConfigs from one dict of fields per preset plus the fields all of them share."""
    return tuple(ModelConfig(model_type=model_type, **{**shared, **row}) for row in rows)
