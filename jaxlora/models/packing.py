"""16-bit floats carried through the layer scan as integers holding the same bits.

XLA's CPU backend computes no bf16/fp16 op but dots natively: it rewrites a bf16 dynamic-slice or
dynamic-update-slice as convert-to-f32, slice, convert-back over the *whole* operand. Inside the
layer scan that is every stacked frozen weight (sliced once per layer, forward and backward) and
every stacked activation the backward pass keeps (written once per layer): the forward loop then
moves O(n_layer^2) bytes, and the backward loop gets f32 copies of all weights and residuals
(benchmarks/RESULTS.md). Integer slices are native, and a bitcast between bf16 and uint16 costs
nothing on any backend, so:

- `to_storage` turns a 16-bit float array into its bits (bf16 -> uint16, fp16 -> int16) before the
  scan slices it, and `from_storage` turns it back where it is used;
- `checkpoint` is `jax.checkpoint` of a function whose saved inputs are kept as bits;
- `linear.matmul` keeps its saved operands as bits.

Other dtypes pass through unchanged. The storage dtype names the float type, so decoding needs no
side information.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BITS = {jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.uint16), jnp.dtype(jnp.float16): jnp.dtype(jnp.int16)}
_FLOATS = {bits: float_ for float_, bits in _BITS.items()}


def pack(x: jax.Array) -> jax.Array:
    """A 16-bit float array as its bits (same shape); any other array unchanged. Not differentiable:
    for values the backward pass reads (residuals), not for values it differentiates."""
    bits = _BITS.get(jnp.dtype(x.dtype))
    return x if bits is None else jax.lax.bitcast_convert_type(x, bits)


def is_bits(dtype) -> bool:
    """Whether `dtype` is the storage dtype of a 16-bit float (uint16 or int16)."""
    return jnp.dtype(dtype) in _FLOATS


def from_storage(x: jax.Array) -> jax.Array:
    """The inverse of `pack` / `to_storage`: bits back to the 16-bit float they hold; others unchanged."""
    float_ = _FLOATS.get(jnp.dtype(x.dtype))
    return x if float_ is None else jax.lax.bitcast_convert_type(x, float_)


@jax.custom_jvp
def to_storage(x: jax.Array) -> jax.Array:
    """`pack` for frozen weights entering the layer scan; differentiating through it is an error
    (the bits carry no gradient), never a silent zero."""
    return pack(x)


@to_storage.defjvp
def _to_storage_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    if jnp.dtype(x.dtype) not in _BITS:
        return x, t
    raise TypeError("a 16-bit frozen weight was differentiated: jaxlora keeps bf16/fp16 block weights as "
                    "their bits inside the layer scan, so they cannot be trained; train LoRA params, or "
                    "load the model in float32 to differentiate every weight")


def checkpoint(fn):
    """`jax.checkpoint(fn)` for array arguments: the backward pass recomputes `fn` from its inputs,
    which are saved as bits where they are 16-bit floats."""

    def call(*args):
        dtypes = tuple(a.dtype for a in args)

        @jax.custom_vjp
        def f(*xs):
            return fn(*xs)

        def fwd(*xs):
            return fn(*xs), tuple(pack(x) for x in xs)

        def bwd(saved, g):
            xs = tuple(from_storage(s) if d in _BITS else s for s, d in zip(saved, dtypes))
            return jax.vjp(fn, *xs)[1](g)

        f.defvjp(fwd, bwd)
        return f(*args)

    return call
