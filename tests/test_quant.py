"""models.quant: bitsandbytes' code books, the 4-bit packing, error bounds of every format, padding and jit."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxlora.errors import ConfigError
from jaxlora.models import quant
from jaxlora.models.quant import (DYNAMIC_CODE, FP4_CODE, NF4_CODE, QUANTIZE, dequantize, dequantize_np,
                                  fields, quantize, resolve)

FOUR_BIT = ("nf4", "fp4", "nf4-dq", "fp4-dq")
CODE = {"nf4": NF4_CODE, "fp4": FP4_CODE}

# The NF4 levels as bitsandbytes' functional.get_4bit_type("nf4") lists them (also QLoRA, arXiv:2305.14314,
# Appendix E); index = the 4-bit code.
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0]
# bitsandbytes' get_4bit_type("fp4"): [0, 0.0625, 8, 12, 4, 6, 2, 3] then the same negated (bit 3 = sign),
# divided by 12.
FP4_PUBLISHED = [0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 0.5, 1 / 6, 0.25,
                 -0.0, -1 / 192, -2 / 3, -1.0, -1 / 3, -0.5, -1 / 6, -0.25]


def _half_gap(code: np.ndarray) -> float:
    """Half the largest gap between adjacent values of a code book covering [-1, 1] (ends included)."""
    s = np.unique(np.concatenate([code.astype(np.float64), [-1.0, 1.0]]))
    return float(np.diff(s).max() / 2)


def _absmax(q: dict, fmt: str) -> np.ndarray:
    """The absmax [..., nb, out] that dequantize uses, rebuilt here in numpy."""
    if not fmt.endswith("-dq"):
        return q["absmax"]
    n_out = q["absmax_codes"].shape[-1]
    scale = np.repeat(q["absmax_scale"], quant.SCALE_BLOCK, axis=-1)[..., :n_out]
    level = DYNAMIC_CODE[q["absmax_codes"]].astype(np.float64)  # code * scale + offset, rounded once (an FMA)
    return (level * scale + q["absmax_offset"][..., None, None]).astype(np.float32)


def _unpack(codes: np.ndarray) -> np.ndarray:
    """uint8 [..., rows, out] -> 4-bit codes [..., 2*rows, out], high nibble first."""
    return np.stack([codes >> 4, codes & 15], axis=-2).reshape(*codes.shape[:-2], -1, codes.shape[-1])


def test_code_books():
    np.testing.assert_allclose(NF4_CODE, NF4_PUBLISHED, rtol=0, atol=1e-7)
    assert NF4_CODE.dtype == np.float32 and NF4_CODE[7] == 0 and np.all(np.diff(NF4_CODE) > 0)
    np.testing.assert_allclose(FP4_CODE, FP4_PUBLISHED, rtol=0, atol=1e-7)
    assert FP4_CODE.dtype == np.float32 and np.signbit(FP4_CODE[8])
    # create_dynamic_map(signed=True): 7 levels i of +-10^(i-6) * the 2^i midpoints of linspace(0.1, 1, 2^i+1),
    # plus 0 and 1.0 (no -1.0: the most negative value is -(1 - 0.9/128)).
    d = DYNAMIC_CODE
    assert d.shape == (256,) and d.dtype == np.float32 and np.all(np.diff(d) > 0)
    assert d[127] == 0 and d[255] == 1.0 and d[0] == np.float32(-0.99296875) and d.min() > -1
    assert (d < 0).sum() == 127 and (d > 0).sum() == 128
    # Spot checks: bnb's create_dynamic_map run with torch 2.13 on CPU (x86-64 AVX2 kernels, whose linspace
    # is a fused multiply-add; index 18 is 1 ulp lower, -0.73984378576, in a build without FMA).
    spot = {0: -0.992968738079071, 1: -0.9789062738418579, 18: -0.7398437261581421, 63: -0.10703125596046448,
            126: -5.500000384017767e-07, 128: 5.500000384017767e-07, 129: 3.250000190746505e-06,
            131: 2.1249998098937795e-05, 200: 0.23359374701976776, 254: 0.992968738079071}
    for i, v in spot.items():
        assert d[i] == np.float32(v), (i, d[i], v)


def test_packing_layout_by_hand():
    # in=128 (two blocks), out=2. Column 0, block 0: absmax 2; elements 0..3 = 2, -2, 0, 2*NF4[8], then 0:
    # codes 15, 0, 7, 8, then 7 -> bytes 0xF0, 0x78, then 0x77. Block 1: absmax 0.5 at element 64 + 1:
    # codes 7, 15 -> 0x7F, then 0x77. Column 1 is all zero: 0x77 everywhere, absmax 0.
    w = np.zeros((128, 2), np.float32)
    w[:4, 0] = [2.0, -2.0, 0.0, 2 * NF4_CODE[8]]
    w[65, 0] = 0.5
    q = quantize(w, "nf4")
    expect = np.full((64, 2), 0x77, np.uint8)
    expect[0, 0], expect[1, 0], expect[32, 0] = 0xF0, 0x78, 0x7F
    np.testing.assert_array_equal(q["codes"], expect)
    np.testing.assert_array_equal(q["absmax"], [[2.0, 0.0], [0.5, 0.0]])
    # FP4 (codes by bit pattern): 12 -> code 3 (12/12), -6 -> code 13 (-6/12), 0 -> code 0; absmax 12.
    w = np.zeros((64, 1), np.float32)
    w[:3, 0] = [12.0, -6.0, 0.0]
    q = quantize(w, "fp4")
    np.testing.assert_array_equal(q["codes"][:2, 0], [0x3D, 0x00])
    assert not q["codes"][2:].any() and q["absmax"][0, 0] == 12
    # For in % 64 == 0, codes.T flattened is bnb's packed [out*in/2] tensor: torch row o = our column o.
    assert dequantize_np(q, "fp4", 64)[:3, 0].tolist() == [12.0, -6.0, 0.0]


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_round_trip_4bit(fmt):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 48)).astype(np.float32)
    q = quantize(w, fmt)
    deq = dequantize_np(q, fmt, 256)
    # Each value is scaled by its block absmax into [-1, 1], which the code book covers end to end, and
    # mapped to the nearest code: the error is at most half the gap it falls in <= half the largest gap,
    # times the block absmax (plus float rounding).
    bound = np.repeat(q["absmax"], quant.BLOCK, axis=0) * (_half_gap(CODE[fmt]) + 1e-6)
    assert np.all(np.abs(deq - w) <= bound)
    # dequantize is exactly code value * absmax, and every block's absmax is its max |w|.
    np.testing.assert_array_equal(q["absmax"], np.abs(w).reshape(4, 64, 48).max(axis=1))
    recon = CODE[fmt][_unpack(q["codes"])] * np.repeat(q["absmax"], quant.BLOCK, axis=0)
    np.testing.assert_array_equal(deq, recon)
    # Values that are code points * absmax (each block holding a +-1 code) come back exactly.
    k = rng.integers(0, 16, size=(256, 48))
    k[::64] = 3 if fmt == "fp4" else 15  # code value 1.0
    amax = np.repeat(rng.uniform(0.01, 3.0, size=(4, 48)).astype(np.float32), 64, axis=0)
    exact = CODE[fmt][k] * amax
    np.testing.assert_array_equal(dequantize_np(quantize(exact, fmt), fmt, 256), exact)


@pytest.mark.parametrize("fmt", ["nf4-dq", "fp4-dq"])
def test_double_quant(fmt):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((2, 128, 600)) * rng.uniform(0.1, 2.0, size=(2, 1, 600))).astype(np.float32)
    q, plain = quantize(w, fmt), quantize(w, fmt[:3])
    np.testing.assert_array_equal(q["codes"], plain["codes"])  # 4-bit codes use the exact absmax, as bnb
    np.testing.assert_allclose(q["absmax_offset"], plain["absmax"].mean(axis=(1, 2)), rtol=1e-6)
    # absmax - offset is scaled per 256 block into [-1, 1] and rounded to the nearest DYNAMIC_CODE value:
    # error <= half its largest gap (the gap from -1 to its min is no larger) times the block scale.
    scale = np.repeat(q["absmax_scale"], quant.SCALE_BLOCK, axis=-1)[..., :600]
    err = np.abs(_absmax(q, fmt) - plain["absmax"])
    assert np.all(err <= scale * (_half_gap(DYNAMIC_CODE) + 1e-6))
    assert np.all(err <= 0.01 * plain["absmax"].max())
    # The 4-bit bound plus that absmax error (|code| <= 1).
    deq = dequantize_np(q, fmt, 128)
    bound = np.repeat(plain["absmax"] * (_half_gap(CODE[fmt[:3]]) + 1e-6) + err * (1 + 1e-6) + 1e-7, 64, axis=1)
    assert np.all(np.abs(deq - w) <= bound)
    np.testing.assert_array_equal(deq, CODE[fmt[:3]][_unpack(q["codes"])] * np.repeat(_absmax(q, fmt), 64, 1))


def test_int8():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((100, 7)).astype(np.float32)
    w[:, 4] = 0
    q = quantize(w, "bnb.int8")
    assert q["codes"].dtype == np.int8 and q["scale"].shape == (7,)
    np.testing.assert_allclose(q["scale"], np.abs(w).max(axis=0) / 127, rtol=1e-7)
    np.testing.assert_array_equal(np.abs(q["codes"]).max(axis=0), [127, 127, 127, 127, 0, 127, 127])
    deq = dequantize_np(q, "int8", 100)
    assert np.all(np.abs(deq - w) <= q["scale"] * (0.5 + 1e-6))
    assert np.all(np.isfinite(deq)) and not deq[:, 4].any()


@pytest.mark.parametrize("n_in", [40, 100])
@pytest.mark.parametrize("fmt", FOUR_BIT + ("int8",))
def test_padding_leading_dims_and_jit(fmt, n_in):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, n_in, 20)).astype(ml_dtypes.bfloat16)  # experts [3, in, out], bf16 input
    spec = fields(fmt, w.shape, ("expert", "embed", "mlp"))
    q = quantize(w, fmt)
    assert all(isinstance(v, np.ndarray) for v in q.values())
    assert {k: (v.shape, v.dtype) for k, v in q.items()} == {k: (f.shape, f.dtype) for k, f in spec.items()}
    q2 = quantize(w[0], fmt)
    assert {k: v.shape for k, v in q2.items()} == {k: f.shape for k, f in fields(fmt, w.shape[1:], (None,) * 2).items()}
    assert all(isinstance(v, np.ndarray) for v in q2.values())
    host = dequantize_np(q, fmt, n_in)
    assert host.shape == (3, n_in, 20) and host.dtype == np.float32
    w32 = w.astype(np.float32)
    if fmt == "int8":
        assert np.all(np.abs(host - w32) <= q["scale"][:, None, :] * 0.501)
    else:
        amax = np.repeat(quant.quantize(w, fmt[:3])["absmax"], 64, axis=1)[:, :n_in]
        assert np.all(np.abs(host - w32) <= amax * 0.2)  # a loose 4-bit bound; exact ones are tested above
        for e in range(3):  # each expert alone quantizes the same (the offset is per leading index)
            np.testing.assert_array_equal(dequantize_np(quantize(w[e], fmt), fmt, n_in), host[e])
    # As inside a scan over layers: dequantize gets per-slice arrays, under jit. -dq's absmax is code * scale
    # + offset: one rounding where XLA fuses it into an FMA (as dequantize_np computes it), two where not,
    # so it may differ by 1 ulp; everything else is exact.
    same = np.testing.assert_array_equal if fmt in ("nf4", "fp4", "int8") else (
        lambda a, b: np.testing.assert_array_max_ulp(a, b, maxulp=1))
    f = jax.jit(lambda qs: dequantize(qs, fmt, n_in, jnp.float32))
    for e in range(3):
        same(np.asarray(f({k: jnp.asarray(v[e]) for k, v in q.items()})), host[e])
    _, stacked = jax.lax.scan(lambda c, qs: (c, dequantize(qs, fmt, n_in, jnp.float32)), None,
                              {k: jnp.asarray(v) for k, v in q.items()})
    same(np.asarray(stacked), host)
    bf16 = jax.jit(lambda qs: dequantize(qs, fmt, n_in, jnp.bfloat16))({k: jnp.asarray(v) for k, v in q.items()})
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf16), np.asarray(stacked).astype(ml_dtypes.bfloat16))


def test_fields_axes():
    spec = fields("bnb.nf4-dq", (3, 100, 600), ("expert", "embed", "mlp"))
    assert spec["codes"] == quant.Field((3, 64, 600), np.dtype(np.uint8), ("expert", "embed", "mlp"))
    assert spec["absmax_codes"].shape == (3, 2, 600) and spec["absmax_codes"].axes == ("expert", "embed", "mlp")
    assert spec["absmax_scale"] == quant.Field((3, 2, 3), np.dtype(np.float32), ("expert", "embed", None))
    assert spec["absmax_offset"] == quant.Field((3,), np.dtype(np.float32), ("expert",))
    spec = fields("fp4", (4096, 14336), ("embed", "mlp"))
    assert {k: f.shape for k, f in spec.items()} == {"codes": (2048, 14336), "absmax": (64, 14336)}
    assert fields("nf4-dq", (64, 8), ("embed", "heads"))["absmax_offset"] == quant.Field((), np.float32, ())
    spec = fields("int8", (2, 64, 8), ("expert", "embed", "mlp"))
    assert spec["codes"].axes == ("expert", "embed", "mlp") and spec["scale"].axes == ("expert", "mlp")


def test_resolve():
    expect = {"bnb.nf4": "nf4", "bnb.nf4-dq": "nf4-dq", "bnb.fp4": "fp4", "bnb.fp4-dq": "fp4-dq",
              "bnb.int8": "int8", "nf4": "nf4", "int8": "int8", "nf4-dq": "nf4-dq", "fp4": "fp4",
              "fp4-dq": "fp4-dq"}
    assert QUANTIZE == expect
    assert {name: resolve(name) for name in expect} == expect
    assert resolve(None) is None
    with pytest.raises(ConfigError, match="bnb.nf4.*got 'bnb.nf2'"):
        resolve("bnb.nf2")
    with pytest.raises(ConfigError):
        quantize(np.zeros((64, 1), np.float32), "int4")


if importlib.util.find_spec("bitsandbytes") is not None:  # not a dependency: compared only where installed

    def test_against_bitsandbytes():
        import torch
        from bitsandbytes import functional as F

        for name, code in CODE.items():
            np.testing.assert_array_equal(F.get_4bit_type(name, device="cpu").numpy(), code)
        np.testing.assert_allclose(F.create_dynamic_map(signed=True).numpy(), DYNAMIC_CODE, rtol=0, atol=1e-7)
        w = np.random.default_rng(4).standard_normal((128, 16)).astype(np.float32)
        packed, state = F.quantize_4bit(torch.from_numpy(w.T.copy()), blocksize=64, quant_type="nf4")
        q = quantize(w, "nf4")
        np.testing.assert_array_equal(packed.numpy().reshape(-1), q["codes"].T.reshape(-1))
        np.testing.assert_array_equal(state.absmax.numpy(), q["absmax"].T.reshape(-1))
