"""Precision policies, named as LitGPT's (Lightning's) `--precision` values.

A policy fixes two dtypes: `param_dtype` for the frozen (base) weights and `compute_dtype` for
activations and matmuls. LoRA weights, their gradients and the optimizer state are always fp32
(negligible memory, no underflow of small updates); the model computes norms, softmax, logits
and the loss in fp32 whatever the policy.

  bf16-true   frozen bf16, compute bf16     (the default where bf16 is native: GPU sm80+, TPU)
  bf16-mixed  frozen fp32, compute bf16
  32-true     frozen fp32, compute fp32     (the default on CPU)
  16-true     frozen fp16, compute fp16
  16-mixed    frozen fp32, compute fp16

fp16 runs without loss scaling: activation gradients below fp16's range flush to zero. Prefer bf16.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlora.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    param_dtype: jnp.dtype  # frozen weights
    compute_dtype: jnp.dtype  # activations and matmul inputs; LoRA weights, gradients, optimizer state: fp32

    def describe(self) -> str:
        return (f"{self.name} (frozen weights {self.param_dtype.name}, compute {self.compute_dtype.name}, "
                "LoRA weights and optimizer state float32)")


_BF16, _FP16, _FP32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)

POLICIES = {
    "bf16-true": Policy("bf16-true", _BF16, _BF16),
    "bf16-mixed": Policy("bf16-mixed", _FP32, _BF16),
    "32-true": Policy("32-true", _FP32, _FP32),
    "16-true": Policy("16-true", _FP16, _FP16),
    "16-mixed": Policy("16-mixed", _FP32, _FP16),
}


def backend_supports_bf16(backend: str | None = None) -> bool:
    """Whether `backend` computes bf16 natively: TPU, and GPUs of compute capability >= 8.0.

    CPU returns False: XLA's CPU backend accepts bf16 but runs its dots no faster than fp32.
    """
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return True
    if backend in ("gpu", "cuda", "rocm"):
        device = jax.devices(backend)[0]
        capability = getattr(device, "compute_capability", None)  # e.g. "9.0" on CUDA; absent on ROCm
        return capability is None or float(capability) >= 8.0
    return False


def resolve_precision(name: str | None, backend: str | None = None) -> tuple[Policy, str]:
    """-> (policy, a one-line message saying what was chosen and why).

    None picks `bf16-true` where `backend` (default: jax's) computes bf16 natively, else `32-true`.
    """
    if name is None:
        backend = backend or jax.default_backend()
        native = backend_supports_bf16(backend)
        policy = POLICIES["bf16-true" if native else "32-true"]
        why = "computes bf16 natively" if native else "has no native bf16 compute"
        return policy, f"precision: {policy.describe()}, picked because the {backend} backend {why}"
    if name not in POLICIES:
        raise ConfigError(f"unknown precision {name!r}; choose one of {', '.join(POLICIES)}")
    policy = POLICIES[name]
    return policy, f"precision: {policy.describe()}"
