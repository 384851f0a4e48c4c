"""jaxlora.models.rope against transformers' own rotary embedding modules (PyTorch, CPU, fp32).

Each case builds the HF config (LlamaConfig, or Phi3Config for longrope), runs its RotaryEmbedding module on
position_ids of several lengths (below and above the original maximum) and compares inv_freq, attention_scaling
and cos/sin with ours.

Tolerances. Both sides are float32 computations of the same formula in the same op order; they differ only
where torch's vectorised float32 pow (faithfully rounded, <= 1 ulp) and ours (correctly rounded) round
differently, so inv_freq must agree to 2 ulps (dynamic NTK chains two pows). cos/sin agree to atol 1e-6 plus
the angle error such an ulp causes at position p (p * d_inv_freq + 1 ulp of the angle, only for the entries that
differ): an angle of ~1e3 rad shifts by ~1e-4 for a 1-ulp inv_freq change, which no fixed atol covers; entries
that are bit-identical (most) get plain atol 1e-6, and any real mistake moves inv_freq by far more than 2 ulps.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the reference is transformers 5's rope code", allow_module_level=True)

from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding  # noqa: E402

from jaxlora.errors import CheckpointError  # noqa: E402
from jaxlora.models.rope import (  # noqa: E402
    ROPE_TYPES,
    inv_freq_and_scaling,
    is_dynamic,
    parse_rope_scaling,
    rope_scaling_to_hf,
)

MAX_ULPS = 2
ATOL = 1e-6
SHORT = [float(x) for x in np.linspace(1.0, 1.6, 32)]  # longrope factors for head_dim 64
LONG = [float(x) for x in np.linspace(1.0, 16.0, 32)]


def _ulps(a, b) -> int:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    return int(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64)).max())


def _hf_config(rope, *, mpe, theta=10000.0, head_dim=64, top_ompe=None, phi3=False):
    kw = {} if top_ompe is None else {"original_max_position_embeddings": top_ompe}
    cls = transformers.Phi3Config if phi3 else transformers.LlamaConfig
    return cls(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=2, head_dim=head_dim,
               max_position_embeddings=mpe, rope_theta=theta, rope_scaling=copy.deepcopy(rope), **kw)


def _hf_call(module, length):
    """(inv_freq, attention_scaling, cos, sin) of one HF forward over positions 0..length-1."""
    cos, sin = module(torch.zeros(1, dtype=torch.float32), torch.arange(length)[None])
    return module.inv_freq.numpy().copy(), module.attention_scaling, cos[0].numpy(), sin[0].numpy()


def _check(ours_inv, ours_scale, hf, positions):
    """Compare (inv_freq, scaling) with an _hf_call result; cos/sin = cos/sin(pos * inv_freq) * scaling."""
    inv_hf, scale_hf, cos_hf, sin_hf = hf
    inv = np.asarray(ours_inv)
    assert inv.dtype == np.float32 and np.asarray(ours_scale).dtype == np.float32
    assert _ulps(inv, inv_hf) <= MAX_ULPS
    np.testing.assert_allclose(float(ours_scale), scale_hf, rtol=1e-7)
    scale = np.float32(ours_scale)
    angle = np.asarray(positions, np.float32)[:, None] * inv[None]  # float32 product, as torch
    angle = np.concatenate([angle, angle], -1)
    ours_cos = np.cos(angle.astype(np.float64)).astype(np.float32) * scale
    ours_sin = np.sin(angle.astype(np.float64)).astype(np.float32) * scale
    # Where inv_freq differs (by <= 2 ulps), the angle may differ by p * |d inv_freq| + 1 ulp (product rounding);
    # where it is bit-identical the float32 angles are identical and only cos/sin rounding (<< 1e-6) remains.
    d_inv = np.abs(inv.astype(np.float64) - inv_hf)
    d_inv = np.concatenate([d_inv, d_inv])[None]
    angle_err = np.asarray(positions, np.float64)[:, None] * d_inv + np.spacing(np.abs(angle)) * (d_inv > 0)
    tol = ATOL + angle_err * abs(scale)
    assert np.all(np.abs(ours_cos - cos_hf) <= tol)
    assert np.all(np.abs(ours_sin - sin_hf) <= tol)


# name -> (rope dict as in config.json, HF config kwargs, head_dim, theta)
STATIC = {
    "linear": ({"type": "linear", "factor": 4.0}, {"mpe": 2048}),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}, {"mpe": 4096}),
    "yarn_attention_factor": ({"rope_type": "yarn", "factor": 4, "attention_factor": 1.3,
                               "original_max_position_embeddings": 1024}, {"mpe": 4096}),
    "yarn_mscale": ({"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096}, {"mpe": 163840, "theta": 1e4}),
    "yarn_betas_no_truncate": ({"rope_type": "yarn", "factor": 8.0, "beta_fast": 16, "beta_slow": 2,
                                "truncate": False, "original_max_position_embeddings": 512}, {"mpe": 4096}),
    "yarn_ompe_defaults_to_mpe": ({"rope_type": "yarn", "factor": 2.0}, {"mpe": 2048}),
    "yarn_top_level_ompe_wins": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
                                 {"mpe": 8192, "top_ompe": 1024, "theta": 5e5}),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024}, {"mpe": 8192, "theta": 5e5, "head_dim": 128}),
}


def _parse(rope, kw):
    return parse_rope_scaling(copy.deepcopy(rope), max_position_embeddings=kw["mpe"],
                              original_max_position_embeddings=kw.get("top_ompe"))


def test_default_matches_transformers():
    for rope in (None, {}, {"rope_type": "default"}, {"type": "default", "rope_theta": 1e4}):
        assert parse_rope_scaling(rope, max_position_embeddings=2048) is None
    module = LlamaRotaryEmbedding(_hf_config(None, mpe=2048))
    inv, scale = inv_freq_and_scaling(64, 10000.0, None)
    assert isinstance(inv, np.ndarray) and inv.shape == (32,)
    for length in (1, 100, 3000):
        _check(inv, scale, _hf_call(module, length), np.arange(length))


@pytest.mark.parametrize("name", list(STATIC))
def test_static_types_match_transformers(name):
    rope, kw = STATIC[name]
    head_dim, theta = kw.get("head_dim", 64), kw.get("theta", 10000.0)
    scaling = _parse(rope, kw)
    assert not is_dynamic(scaling)
    module = LlamaRotaryEmbedding(_hf_config(rope, **kw))
    inv, scale = inv_freq_and_scaling(head_dim, theta, scaling)
    assert isinstance(inv, np.ndarray) and inv.shape == (head_dim // 2,)
    for length in (1, 17, 1500):
        _check(inv, scale, _hf_call(module, length), np.arange(length))
    default, _ = inv_freq_and_scaling(head_dim, theta, None)
    assert _ulps(inv, default) > 1000  # the scaling really changes the frequencies


def test_yarn_scaling_and_top_level_ompe_change_the_numbers():
    rope, kw = STATIC["yarn_mscale"]
    mscale = float(inv_freq_and_scaling(64, 1e4, _parse(rope, kw))[1])
    plain = float(inv_freq_and_scaling(64, 1e4, _parse({"rope_type": "yarn", "factor": 40.0}, kw))[1])
    assert mscale == pytest.approx(1.0857264) and plain == pytest.approx(0.1 * np.log(40) + 1)
    rope, kw = STATIC["yarn_top_level_ompe_wins"]
    assert dict(_parse(rope, kw))["original_max_position_embeddings"] == 1024
    inner = inv_freq_and_scaling(64, 5e5, _parse(rope, {"mpe": 8192}))[0]
    assert _ulps(inner, inv_freq_and_scaling(64, 5e5, _parse(rope, kw))[0]) > 0


def test_llama3_bands():
    rope, kw = STATIC["llama3"]
    inv, _ = inv_freq_and_scaling(128, 5e5, _parse(rope, kw))
    default, _ = inv_freq_and_scaling(128, 5e5, None)
    ratio = default / inv
    assert np.any(ratio == 1) and np.any(ratio == 8) and np.any((ratio > 1.01) & (ratio < 7.99))


DYNAMIC = {
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, {"mpe": 512}, (16, 512, 513, 2000)),
    # odd numbers: a divide by 500 or a float64 base must be rounded as torch does
    "dynamic_odd": ({"type": "dynamic", "factor": 3.7}, {"mpe": 500, "theta": 123456.789, "head_dim": 96},
                    (16, 500, 501, 512, 513, 1234, 77777)),
    "longrope": ({"type": "longrope", "short_factor": SHORT, "long_factor": LONG},
                 {"mpe": 8192, "top_ompe": 1024, "phi3": True}, (100, 1024, 1025, 3000)),
    "longrope_factor_in_dict": ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "factor": 4.0,
                                 "original_max_position_embeddings": 1024}, {"mpe": 8192}, (1024, 1025)),
    "longrope_attention_factor": ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                                   "attention_factor": 1.5}, {"mpe": 2048, "top_ompe": 512, "phi3": True},
                                  (512, 513)),
}


@pytest.mark.parametrize("name", list(DYNAMIC))
def test_dynamic_types_match_transformers_eager_and_jit(name):
    rope, kw, lengths = DYNAMIC[name]
    head_dim, theta = kw.get("head_dim", 64), kw.get("theta", 10000.0)
    scaling = _parse(rope, kw)
    assert is_dynamic(scaling)
    embedding = Phi3RotaryEmbedding if kw.get("phi3") else LlamaRotaryEmbedding
    config = _hf_config(rope, **kw)
    jitted = jax.jit(lambda n: inv_freq_and_scaling(head_dim, theta, scaling, n))
    seen = []
    for length in lengths:
        hf = _hf_call(embedding(config), length)  # a fresh module: one forward over the sequence
        inv, scale = inv_freq_and_scaling(head_dim, theta, scaling, length)
        assert isinstance(inv, jax.Array) and inv.shape == (head_dim // 2,)
        _check(inv, scale, hf, np.arange(length))
        inv_jit, scale_jit = jitted(jnp.int32(length))  # traced seq_len
        _check(inv_jit, scale_jit, hf, np.arange(length))
        seen.append(np.asarray(inv))
    assert _ulps(seen[0], seen[-1]) > 1000  # frequencies do change past the original maximum
    assert _ulps(inv_freq_and_scaling(head_dim, theta, scaling)[0], seen[0]) == 0  # None: short sequence


def test_dynamic_generation_loop_matches_stateful_transformers():
    """transformers caches grown frequencies; with positions only growing the per-call rule gives the same."""
    rope, kw, _ = DYNAMIC["dynamic"]
    module = LlamaRotaryEmbedding(_hf_config(rope, **kw))
    scaling = _parse(rope, kw)
    jitted = jax.jit(lambda n: inv_freq_and_scaling(64, 10000.0, scaling, n))
    calls = [np.arange(500)] + [np.array([p]) for p in range(500, 530, 3)]  # prefill, then one token per step
    for positions in calls:
        cos, sin = module(torch.zeros(1), torch.from_numpy(positions)[None])
        hf = (module.inv_freq.numpy().copy(), module.attention_scaling, cos[0].numpy(), sin[0].numpy())
        inv, scale = jitted(jnp.int32(positions.max() + 1))
        _check(inv, scale, hf, positions)


def test_phi3_config_json_matches_transformers(tmp_path):
    """Phi-3 keeps original_max_position_embeddings at top level; transformers gives it priority."""
    cfg = {"model_type": "phi3", "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2,
           "max_position_embeddings": 8192, "original_max_position_embeddings": 1024, "rope_theta": 10000.0,
           "rope_scaling": {"type": "longrope", "short_factor": SHORT, "long_factor": LONG}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    module = Phi3RotaryEmbedding(transformers.AutoConfig.from_pretrained(tmp_path))
    scaling = parse_rope_scaling(cfg["rope_scaling"], max_position_embeddings=cfg["max_position_embeddings"],
                                 original_max_position_embeddings=cfg["original_max_position_embeddings"])
    for length in (1024, 1025):
        inv, scale = inv_freq_and_scaling(64, 10000.0, scaling, length)
        _check(inv, scale, _hf_call(module, length), np.arange(length))


ALL = {name: (rope, kw) for name, (rope, kw) in STATIC.items()}
ALL.update({name: (rope, kw) for name, (rope, kw, _) in DYNAMIC.items()})


@pytest.mark.parametrize("name", list(ALL))
def test_round_trip_and_canonical_form(name):
    rope, kw = ALL[name]
    scaling = _parse(rope, kw)
    hash(scaling)
    assert list(scaling) == sorted(scaling) and dict(scaling)["rope_type"] in ROPE_TYPES
    hf = rope_scaling_to_hf(scaling)
    json.dumps(hf)
    assert "max_position_embeddings" not in hf and hf["rope_type"] == dict(scaling)["rope_type"]
    assert parse_rope_scaling(hf, max_position_embeddings=kw["mpe"]) == scaling
    assert rope_scaling_to_hf(None) is None


def test_legacy_type_and_neutral_keys():
    canonical = parse_rope_scaling({"rope_type": "linear", "factor": 4.0}, max_position_embeddings=2048)
    assert canonical == (("factor", 4.0), ("rope_type", "linear"))
    for rope in ({"type": "linear", "factor": 4}, {"rope_type": "linear", "type": "linear", "factor": 4.0,
                 "rope_theta": 1e6, "partial_rotary_factor": 0.5}):
        assert parse_rope_scaling(rope, max_position_embeddings=2048) == canonical
    assert dict(parse_rope_scaling({"type": "dynamic", "factor": 2}, max_position_embeddings=777))[
        "max_position_embeddings"] == 777


@pytest.mark.parametrize("rope, named", [
    ({"rope_type": "foo"}, "'foo'"),
    ({"type": "su", "short_factor": SHORT, "long_factor": LONG}, "'su'"),
    ({"rope_type": "linear", "factor": 2.0, "foo_factor": 3.0}, "'foo_factor'"),
    ({"rope_type": "default", "mrope_section": [8, 12, 12]}, "'mrope_section'"),
    ({"rope_type": "linear"}, "'factor'"),
    ({"rope_type": "yarn", "factor": None}, "'factor'"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "'high_freq_factor'"),
    ({"rope_type": "longrope", "short_factor": SHORT}, "'long_factor'"),
    ({"rope_type": "linear", "factor": "4"}, "'factor'"),
    ({"rope_type": "linear", "factor": 0}, "'factor'"),
    ({"rope_type": "longrope", "short_factor": 1.0, "long_factor": LONG}, "'short_factor'"),
    ("linear", "rope_scaling"),
])
def test_refusals_name_the_field(rope, named):
    with pytest.raises(CheckpointError) as err:
        parse_rope_scaling(rope, max_position_embeddings=4096)
    message = str(err.value)
    assert named in message and "\n" not in message and message.count(". ") == 0 and message.endswith(".")


def test_longrope_factor_length_must_match_dim():
    scaling = parse_rope_scaling({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG},
                                 max_position_embeddings=4096)
    with pytest.raises(CheckpointError, match="33 entries"):
        inv_freq_and_scaling(64 + 2, 10000.0, scaling, 10)
