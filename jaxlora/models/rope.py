"""RoPE inverse frequencies for every HF rope scaling type, as transformers 5.25 computes them.

Static types (default, linear, yarn, llama3) are computed with numpy, replicating transformers' float32
step order (float32 exponent ``arange/dim``, float32 ``base``, scalars cast to float32 before each op,
``a / x`` as ``reciprocal(x) * a``); only ``pow`` is evaluated in float64 and rounded once, so results are
within 1 ulp of torch (whose vectorised float32 pow is faithfully, not correctly, rounded).

Dynamic types (dynamic, longrope) depend on ``seq_len`` = max position id + 1 of the current call. transformers'
``dynamic_rope_update`` is stateful (it caches grown frequencies); we implement the per-call rule instead:
dynamic uses NTK frequencies for ``seq_len > max_position_embeddings`` (from ``max(seq_len, max)``), else the
default ones; longrope uses the long factors iff ``seq_len > original_max_position_embeddings``. This equals
transformers for one forward over a sequence and for its generation loop, where positions only grow.
"""

import math

import jax.numpy as jnp
import numpy as np

from jaxlora.errors import CheckpointError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")

_F32 = np.float32
_OMPE = "original_max_position_embeddings"
# Keys that never change the math here: the type itself, rope_theta (the caller passes it as `base`) and
# partial_rotary_factor (the caller folds it into `dim`).
_NEUTRAL = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
# rope_type -> (required keys, optional keys), as transformers' `_validate_<type>_rope_parameters`; an
# original_max_position_embeddings in a default/linear/dynamic dict is ignored by transformers, so by us too.
_KEYS = {
    "default": (set(), {_OMPE}),
    "linear": ({"factor"}, {_OMPE}),
    "dynamic": ({"factor"}, {_OMPE}),
    "yarn": ({"factor"}, {_OMPE, "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    "longrope": ({"short_factor", "long_factor"}, {_OMPE, "attention_factor", "factor"}),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor"}, {_OMPE}),
}


def _num(rope_type: str, key: str, value, *, integer: bool = False):
    """A finite JSON number (int when `integer`), else CheckpointError naming the field."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (integer and (value <= 0 or value != int(value))):
        kind = "a positive integer" if integer else "a number"
        raise CheckpointError(
            f"rope_scaling {key!r} for rope_type {rope_type!r} in config.json must be {kind}, got {value!r}."
        )
    return int(value) if integer else float(value)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def parse_rope_scaling(
    rope: dict | None, *, max_position_embeddings: int, original_max_position_embeddings: int | None = None
) -> tuple[tuple[str, object], ...] | None:
    """HF rope_scaling / rope_parameters dict -> sorted hashable ((key, value), ...) with "rope_type"; None: no scaling.

    Defaults are resolved as transformers does: original_max_position_embeddings (yarn, longrope, llama3) is the
    config's top-level value when it has one (`original_max_position_embeddings`, e.g. Phi-3; transformers gives it
    priority over the dict), else the dict's, else `max_position_embeddings`; yarn beta_fast/beta_slow/truncate
    and attention_factor, longrope factor/attention_factor are filled in. dynamic stores max_position_embeddings.
    A rope_theta / partial_rotary_factor inside the dict overrides the top-level one in transformers; the caller
    must pass that value as `base` / fold it into `dim`.
    """
    if not rope:
        return None
    if not isinstance(rope, dict):
        raise CheckpointError(f"rope_scaling in config.json must be a JSON object, got {rope!r}.")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"unsupported rope_scaling rope_type {rope_type!r} in config.json; supported: {', '.join(ROPE_TYPES)}."
        )
    required, optional = _KEYS[rope_type]
    for key in rope:
        if key not in required | optional | _NEUTRAL:
            raise CheckpointError(f"unsupported rope_scaling key {key!r} for rope_type {rope_type!r} in config.json.")
    for key in sorted(required):
        if rope.get(key) is None:
            raise CheckpointError(f"rope_scaling for rope_type {rope_type!r} in config.json is missing {key!r}.")
    if rope_type == "default":
        return None

    def get(key):  # an optional number (None when absent or null, as transformers' `.get`)
        return None if rope.get(key) is None else _num(rope_type, key, rope[key])

    mpe = max_position_embeddings
    out: dict[str, object] = {"rope_type": rope_type}
    if rope_type in ("yarn", "longrope", "llama3"):
        ompe = original_max_position_embeddings or rope.get(_OMPE) or mpe
        out[_OMPE] = ompe = _num(rope_type, _OMPE, ompe, integer=True)
    if rope_type in ("linear", "dynamic", "yarn", "llama3"):
        out["factor"] = factor = get("factor")
        if factor <= 0:
            raise CheckpointError(
                f"rope_scaling 'factor' for rope_type {rope_type!r} in config.json must be > 0, got {factor!r}."
            )
    if rope_type == "dynamic":
        out["max_position_embeddings"] = _num(rope_type, "max_position_embeddings", mpe, integer=True)
    elif rope_type == "llama3":
        out["low_freq_factor"], out["high_freq_factor"] = get("low_freq_factor"), get("high_freq_factor")
        if out["high_freq_factor"] == out["low_freq_factor"]:
            raise CheckpointError("rope_scaling 'high_freq_factor' for rope_type 'llama3' equals 'low_freq_factor'.")
    elif rope_type == "yarn":
        mscale, mscale_all_dim, attention = get("mscale"), get("mscale_all_dim"), get("attention_factor")
        if attention is None and mscale and mscale_all_dim:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        out["attention_factor"] = _yarn_mscale(factor) if attention is None else attention
        out.update({k: v for k, v in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim)) if v is not None})
        out["beta_fast"], out["beta_slow"] = get("beta_fast") or 32.0, get("beta_slow") or 1.0
        out["truncate"] = bool(rope.get("truncate", True))
    elif rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            if not isinstance(rope[key], (list, tuple)):
                raise CheckpointError(f"rope_scaling {key!r} for rope_type 'longrope' must be a list of numbers.")
            out[key] = tuple(_num(rope_type, key, x) for x in rope[key])
        factor = get("factor")
        if factor is None:
            factor = _num(rope_type, "max_position_embeddings", mpe, integer=True) / ompe
        out["factor"] = factor
        attention = get("attention_factor")
        default_attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(ompe))
        out["attention_factor"] = default_attention if attention is None else attention
    return tuple(sorted(out.items()))


def rope_scaling_to_hf(scaling) -> dict | None:
    """Canonical tuple -> config.json `rope_scaling` dict (tuples as lists; max_position_embeddings stays top-level)."""
    if not scaling:
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in scaling if k != "max_position_embeddings"}


def is_dynamic(scaling) -> bool:
    """True when the frequencies depend on the sequence length seen (dynamic, longrope)."""
    return bool(scaling) and dict(scaling)["rope_type"] in ("dynamic", "longrope")


def _pow(base, exponent: np.ndarray) -> np.ndarray:
    """float32 base ** float32 exponent, correctly rounded (via float64)."""
    return (np.float64(_F32(base)) ** exponent.astype(np.float64)).astype(_F32)


def _yarn(dim: int, base: float, s: dict) -> np.ndarray:
    def correction_dim(rotations):
        return dim * math.log(s[_OMPE] / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s["beta_fast"]), correction_dim(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    pos_freqs = _pow(base, np.arange(0, dim, 2).astype(_F32) / _F32(dim))
    extrapolation = _F32(1) / pos_freqs
    interpolation = _F32(1) / (_F32(s["factor"]) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=_F32) - _F32(low)) / _F32(high - low), _F32(0), _F32(1))
    extrapolation_factor = _F32(1) - ramp
    return interpolation * (_F32(1) - extrapolation_factor) + extrapolation * extrapolation_factor


def _llama3(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    factor, low, context = _F32(s["factor"]), _F32(s["low_freq_factor"]), _F32(s[_OMPE])
    low_wavelen, high_wavelen = _F32(s[_OMPE] / s["low_freq_factor"]), _F32(s[_OMPE] / s["high_freq_factor"])
    wavelen = (_F32(1) / inv_freq) * _F32(2 * math.pi)  # torch: 2 * pi / t == t.reciprocal() * (2 * pi)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = ((_F32(1) / wavelen) * context - low) / _F32(s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (_F32(1) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled)


def inv_freq_and_scaling(dim: int, base: float, scaling, seq_len=None):
    """-> (inv_freq float32 [(dim + 1) // 2], attention_scaling float32 []); cos = cos(pos * inv_freq) * scaling.

    dim: rotated dims of a head (partial rotary already applied); base: rope_theta; scaling: parse_rope_scaling's
    tuple or None. Static types return (np.ndarray, np.float32). Dynamic types (see is_dynamic) return jnp float32
    arrays and are jit-compatible: seq_len (max position id + 1 of this call) is an int or a traced int32 scalar;
    None means a short sequence (the frequencies transformers builds at init).
    """
    s = dict(scaling) if scaling else {"rope_type": "default"}
    rope_type = s["rope_type"]
    exponent = np.arange(0, dim, 2).astype(_F32) / _F32(dim)  # torch.arange(0, dim, 2, int64).float() / dim
    default = _F32(1) / _pow(base, exponent)
    if rope_type == "default":
        return default, _F32(1.0)
    if rope_type == "linear":
        return default / _F32(s["factor"]), _F32(1.0)
    if rope_type == "llama3":
        return _llama3(default, s), _F32(1.0)
    if rope_type == "yarn":
        return _yarn(dim, base, s), _F32(s["attention_factor"])
    seq = jnp.asarray(0 if seq_len is None else seq_len, jnp.int32)
    if rope_type == "dynamic":
        factor, mpe = s["factor"], s["max_position_embeddings"]
        # transformers' init-time frequencies: the NTK formula at seq_len = max_position_embeddings, in float64
        default = _F32(1) / _pow(base * (factor * mpe / mpe - (factor - 1)) ** (dim / (dim - 2)), exponent)
        scaled = jnp.float32(factor) * jnp.maximum(seq, mpe).astype(jnp.float32)
        # A true division as torch does: XLA turns `x / constant` into `x * (1 / constant)`, off by an ulp.
        ratio = scaled / jnp.where(scaled < 0, scaled, jnp.float32(mpe)) - jnp.float32(factor - 1)
        ntk_base = jnp.float32(base) * ratio ** jnp.float32(dim / (dim - 2))
        grown = 1.0 / ntk_base ** jnp.asarray(exponent)
        return jnp.where(seq > mpe, grown, jnp.asarray(default)), jnp.float32(1.0)
    if rope_type == "longrope":
        short, long = (np.asarray(s[k], _F32) for k in ("short_factor", "long_factor"))
        if short.shape != exponent.shape or long.shape != exponent.shape:
            raise CheckpointError(
                f"rope_scaling short_factor/long_factor for rope_type 'longrope' in config.json must have "
                f"{exponent.size} entries (rotary dim {dim} / 2), got {short.size} and {long.size}."
            )
        pos_freqs = _pow(base, exponent)
        short_inv, long_inv = _F32(1) / (short * pos_freqs), _F32(1) / (long * pos_freqs)
        inv_freq = jnp.where(seq > s[_OMPE], jnp.asarray(long_inv), jnp.asarray(short_inv))
        return inv_freq, jnp.float32(s["attention_factor"])
    raise CheckpointError(f"unsupported rope_scaling rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}.")
