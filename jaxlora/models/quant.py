"""Quantized storage of a frozen kernel (QLoRA): bitsandbytes' NF4/FP4 (optionally double-quantized) and int8.

A kernel is laid out ``[..., in, out]`` (leading dims: e.g. experts); the torch weight is ``[out, in]``, so
a bitsandbytes block of 64 consecutive elements of a torch row is 64 consecutive ``in`` elements of one of
our output columns. For ``in % 64 == 0``, ``codes.T`` flattened is bnb's packed 4-bit tensor and
``absmax.T`` flattened is bnb's absmax. Where this differs from bnb:

* ``in`` not a multiple of 64 is zero-padded per column (bnb's blocks run on across torch rows);
* the double quantization ("-dq") quantizes absmax in blocks of 256 along ``out`` (bnb: 256 consecutive
  values of the flattened ``[out, in/64]`` absmax), with one offset per leading index, so that codes,
  absmax codes and scales shard along the kernel's own axes.

`quantize` runs on the host (numpy, float32 math); `dequantize` is pure jnp (jit-able, generic over
leading dims, e.g. inside a scan over layers); `dequantize_np` is the same on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxlora.errors import ConfigError

QUANTIZE: dict[str, str] = {
    "bnb.nf4": "nf4", "bnb.nf4-dq": "nf4-dq", "bnb.fp4": "fp4", "bnb.fp4-dq": "fp4-dq", "bnb.int8": "int8",
    "nf4": "nf4", "nf4-dq": "nf4-dq", "fp4": "fp4", "fp4-dq": "fp4-dq", "int8": "int8",
}

BLOCK = 64  # 4-bit: values per absmax block, along `in`
SCALE_BLOCK = 256  # -dq: absmax values per 8-bit scale block, along `out`
_CHUNK = 1 << 22  # quantize: elements handled at a time (bounds the host's temporaries)

# bitsandbytes functional.get_4bit_type("nf4") (= create_normal_map(0.9677083), the QLoRA paper's levels).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
# bitsandbytes functional.get_4bit_type("fp4"): 1 sign bit (the code's bit 3), 2 exponent bits, 1 mantissa
# bit, listed by code, divided by the max abs (12) in float32.
FP4_CODE = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3],
                    np.float32) / np.float32(12)


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) on CPU: float32 step, the two halves anchored at the ends.

    Each half is one fused multiply-add (as torch's x86-64 AVX2/AVX512 and aarch64 kernels compute it),
    emulated exactly in float64; a build without FMA rounds twice and differs by 1 ulp in places.
    """
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(n - 1))
    k = np.arange(n, dtype=np.float64)
    lo = (np.float64(s) + step * k).astype(np.float32)
    hi = (np.float64(e) - step * (n - 1 - k)).astype(np.float32)
    return np.where(k < n // 2, lo, hi)


def _dynamic_map(max_exponent_bits: int = 7) -> np.ndarray:
    """bitsandbytes functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), sorted.

    Exponent level i (0..6) contributes ±10^(i-6) * the 2^i midpoints of linspace(0.1, 1, 2^i + 1); then 0
    and 1.0: 127 negative values (min -0.99296875), 0 at index 127, 128 positive values (max 1.0).
    """
    values = [np.float32(0.0), np.float32(1.0)]
    for i in range(max_exponent_bits):
        bounds = _linspace_f32(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        level = np.float32(10.0 ** (i - max_exponent_bits + 1)) * means
        values += list(level) + list(-level)
    return np.sort(np.array(values, np.float32))


DYNAMIC_CODE = _dynamic_map()  # float32 [256]: the 8-bit map of double-quantized absmax


def _search_table(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(midpoints [m-1] of the sorted distinct code values, their code indices [m]) for nearest lookup.

    FP4's -0.0 (code 8) is dropped, so everything that rounds to zero gets code 0 (+0.0).
    """
    order = np.argsort(code, kind="stable")
    keep = np.concatenate([[True], np.diff(code[order]) != 0])
    order = order[keep]
    s = code[order]
    return (s[:-1] + s[1:]) / np.float32(2.0), order.astype(np.uint8)


_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
_TABLES = {name: _search_table(c) for name, c in _CODES.items()}
_DYNAMIC_MIDS = _search_table(DYNAMIC_CODE)[0]  # sorted and distinct: the index is the code


def resolve(name: str | None) -> str | None:
    """A user's quantize name (e.g. "bnb.nf4") -> its format ("nf4"); None -> None (a float base)."""
    if name is None:
        return None
    if name not in QUANTIZE:
        raise ConfigError(f"quantize must be one of {', '.join(sorted(QUANTIZE))} (or unset), got {name!r}")
    return QUANTIZE[name]


@dataclasses.dataclass(frozen=True)
class Field:
    """One stored array of a quantized kernel: its shape, dtype and logical axis names (None: replicated)."""

    shape: tuple[int, ...]
    dtype: Any
    axes: tuple


def fields(fmt: str, shape: tuple[int, ...], axes: tuple) -> dict[str, Field]:
    """The arrays a float kernel of ``shape`` [..., in, out] with logical ``axes`` is stored as in ``fmt``.

    4-bit: ``codes`` uint8 [..., nb*32, out] (nb = ceil(in/64); elements 2j, 2j+1 of `in` in byte j's high,
    low nibble) and ``absmax`` float32 [..., nb, out]; with -dq, absmax is ``absmax_codes`` uint8 [..., nb,
    out] (DYNAMIC_CODE indices), ``absmax_scale`` float32 [..., nb, ceil(out/256)], ``absmax_offset``
    float32 [...]. int8: ``codes`` int8 [..., in, out], ``scale`` float32 [..., out].
    """
    fmt, shape, axes = resolve(fmt), tuple(int(d) for d in shape), tuple(axes)
    if len(shape) < 2 or len(axes) != len(shape):
        raise ValueError(f"a kernel needs [..., in, out] with one axis name per dim, got {shape} and {axes}")
    *lead, n_in, n_out = shape
    *lead_ax, ax_in, ax_out = axes
    lead, lead_ax = tuple(lead), tuple(lead_ax)
    if fmt == "int8":
        return {"codes": Field(shape, np.dtype(np.int8), axes),
                "scale": Field(lead + (n_out,), np.dtype(np.float32), lead_ax + (ax_out,))}
    nb = -(-n_in // BLOCK)
    out = {"codes": Field(lead + (nb * BLOCK // 2, n_out), np.dtype(np.uint8), axes)}
    if fmt.endswith("-dq"):
        out["absmax_codes"] = Field(lead + (nb, n_out), np.dtype(np.uint8), axes)
        out["absmax_scale"] = Field(lead + (nb, -(-n_out // SCALE_BLOCK)), np.dtype(np.float32),
                                    lead_ax + (ax_in, None))
        out["absmax_offset"] = Field(lead, np.dtype(np.float32), lead_ax)
    else:
        out["absmax"] = Field(lead + (nb, n_out), np.dtype(np.float32), axes)
    return out


def _nearest(x: np.ndarray, mids: np.ndarray) -> np.ndarray:
    """Index of the nearest sorted code value for each x in [-1, 1] (ties: the lower one, as torch.bucketize)."""
    return np.searchsorted(mids, x, side="left")


def _blockwise(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(absmax over ``axis`` (kept, float32), x scaled into [-1, 1]) as bnb: x * (1 / max(absmax, 1e-38))."""
    absmax = np.abs(x).max(axis=axis, keepdims=True)
    inv = np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))
    return absmax, np.clip(x * inv, -1.0, 1.0)


def quantize(w: np.ndarray, fmt: str) -> dict[str, np.ndarray]:
    """Host-side: one kernel [..., in, out] of any float dtype -> the arrays `fields` describes (numpy)."""
    fmt = resolve(fmt)
    w = np.asarray(w)
    spec = fields(fmt, w.shape, (None,) * w.ndim)
    q = {k: np.zeros(f.shape, f.dtype) for k, f in spec.items()}
    *lead, n_in, n_out = w.shape
    base = fmt.removesuffix("-dq")
    nb = -(-n_in // BLOCK)
    cols = max(1, _CHUNK // (nb * BLOCK))
    absmax = np.zeros((*lead, nb, n_out), np.float32) if fmt != "int8" else None
    for idx in np.ndindex(*lead):
        for o in range(0, n_out, cols):
            x = np.asarray(w[idx][:, o:o + cols], np.float32)  # [in, oc]
            if fmt == "int8":
                amax = np.abs(x).max(axis=0)
                scale = amax / np.float32(127.0)
                safe = np.where(scale > 0, scale, np.float32(1.0))
                q["codes"][idx][:, o:o + cols] = np.clip(np.round(x / safe), -127, 127).astype(np.int8)
                q["scale"][idx][o:o + cols] = scale
                continue
            x = np.pad(x, ((0, nb * BLOCK - n_in), (0, 0))).reshape(nb, BLOCK, -1)
            amax, scaled = _blockwise(x, axis=1)  # [nb, 1, oc], [nb, 64, oc]
            mids, order = _TABLES[base]
            c = order[_nearest(scaled, mids)]
            q["codes"][idx][:, o:o + cols] = ((c[:, 0::2] << 4) | c[:, 1::2]).reshape(nb * BLOCK // 2, -1)
            absmax[idx][:, o:o + cols] = amax[:, 0]
    if fmt == "int8":
        return q
    if not fmt.endswith("-dq"):
        q["absmax"] = absmax
        return q
    # Double quantization: absmax - mean (per leading index), 8-bit dynamic codes in blocks of 256 along out.
    offset = absmax.mean(axis=(-2, -1), dtype=np.float64).astype(np.float32)
    r = absmax - offset[..., None, None]
    ns = -(-n_out // SCALE_BLOCK)
    r = np.pad(r, [(0, 0)] * (r.ndim - 1) + [(0, ns * SCALE_BLOCK - n_out)])
    r = r.reshape(*r.shape[:-1], ns, SCALE_BLOCK)
    scale, scaled = _blockwise(r, axis=-1)
    codes = _nearest(scaled, _DYNAMIC_MIDS).astype(np.uint8)
    q["absmax_codes"] = np.ascontiguousarray(codes.reshape(*codes.shape[:-2], ns * SCALE_BLOCK)[..., :n_out])
    q["absmax_scale"] = np.ascontiguousarray(scale[..., 0])
    q["absmax_offset"] = np.asarray(offset, np.float32)
    return q


def _dequantize(q: Mapping[str, Any], fmt: str, in_features: int, xp) -> Any:
    """float32 [..., in, out] from the stored arrays, with xp = numpy or jax.numpy."""
    fmt = resolve(fmt)
    if fmt == "int8":
        return xp.asarray(q["codes"]).astype(xp.float32) * xp.asarray(q["scale"])[..., None, :]
    codes = xp.asarray(q["codes"])
    *lead, rows, n_out = codes.shape
    nb = rows * 2 // BLOCK
    if fmt.endswith("-dq"):
        scale = xp.repeat(xp.asarray(q["absmax_scale"]), SCALE_BLOCK, axis=-1)[..., :n_out]
        level = xp.asarray(DYNAMIC_CODE)[xp.asarray(q["absmax_codes"]).astype(xp.int32)]
        offset = xp.asarray(q["absmax_offset"])[..., None, None]
        if xp is np:  # one rounding, as XLA's fused multiply-add under jit (CPU, GPU); eager jnp rounds twice
            absmax = (level.astype(np.float64) * scale + offset).astype(np.float32)
        else:
            absmax = level * scale + offset
    else:
        absmax = xp.asarray(q["absmax"])
    nibbles = xp.stack([codes >> 4, codes & 15], axis=-2).astype(xp.int32)  # [..., rows, 2, out]
    values = xp.asarray(_CODES[fmt.removesuffix("-dq")])[nibbles].reshape(*lead, nb, BLOCK, n_out)
    w = (values * absmax[..., :, None, :]).reshape(*lead, nb * BLOCK, n_out)
    return w[..., :in_features, :]


def dequantize(q: Mapping[str, Any], fmt: str, in_features: int, dtype) -> jnp.ndarray:
    """The kernel [..., in_features, out] in ``dtype`` (pure jnp, float32 math; jit-able over any leading dims)."""
    return _dequantize(q, fmt, in_features, jnp).astype(dtype)


def dequantize_np(q: Mapping[str, Any], fmt: str, in_features: int) -> np.ndarray:
    """The same on the host: float32 numpy [..., in_features, out] (for merging and export)."""
    return np.asarray(_dequantize(q, fmt, in_features, np), np.float32)

