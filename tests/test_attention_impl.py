"""The attention implementation chosen per backend (`models.gpt.attention_implementation`): XLA on CPU
(what runs here, and what every parity test uses), cuDNN only where it can serve the model."""

import logging

import jax.numpy as jnp
import pytest

from jaxlora.config import base_config, validate
from jaxlora.errors import ConfigError
from jaxlora.models.config import ModelConfig
from jaxlora.models.gpt import attention_implementation

LLAMA = ModelConfig.from_name("Llama-3.2-1B")
GEMMA2 = ModelConfig.from_name("gemma-2-2b")


@pytest.mark.parametrize("requested,config,dtype,backend,expected", [
    ("auto", LLAMA, jnp.bfloat16, "cpu", "xla"),
    ("auto", LLAMA, jnp.bfloat16, "gpu", "cudnn"),
    ("auto", LLAMA, jnp.float32, "gpu", "xla"),  # cuDNN's fused attention is 16-bit only
    ("auto", GEMMA2, jnp.bfloat16, "gpu", "xla"),  # soft-capped scores
    ("auto", LLAMA, jnp.bfloat16, "tpu", "xla"),
    ("xla", LLAMA, jnp.bfloat16, "gpu", "xla"),
    ("cudnn", LLAMA, jnp.float16, "gpu", "cudnn"),
])
def test_selection(requested, config, dtype, backend, expected):
    assert attention_implementation(requested, config, dtype, backend) == expected


def test_cudnn_that_cannot_serve_falls_back_with_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="jaxlora.models.gpt"):
        assert attention_implementation("cudnn", GEMMA2, jnp.bfloat16, "cpu") == "xla"
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == ("model.attention_impl='cudnn' cannot serve this model (the backend is cpu; its attention scores "
                    "are soft-capped; its head size is 256); using XLA attention")


def test_unknown_implementation_is_refused(tmp_path):
    cfg = base_config()
    cfg.checkpoint_dir, cfg.model.attention_impl = str(tmp_path), "flash"
    with pytest.raises(ConfigError, match="unknown model.attention_impl 'flash'; choose one of auto, xla, cudnn"):
        validate(cfg)
    with pytest.raises(ConfigError, match="must be one of auto, xla, cudnn"):
        attention_implementation("flash", LLAMA, jnp.bfloat16)
