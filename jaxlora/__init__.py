"""jaxlora: LoRA finetuning of GPT-style language models in pure JAX/Flax.

    model = jaxlora.load_model(path, dtype="float32", lora=jaxlora.LoRAConfig(r=8, alpha=16, query=True, value=True))
    logits = model(input_ids)   # int32 [batch, seq] -> float32 [batch, seq, padded_vocab]
    graphdef, lora_params, base_params = jaxlora.split_lora(model)
"""

from jaxlora.checkpoints.hf import load_model
from jaxlora.errors import CheckpointError, ConfigError, DataError, JaxloraError
from jaxlora.models.config import PRESETS, ModelConfig
from jaxlora.models.gpt import GPT
from jaxlora.models.lora import LoRAConfig, count_lora_params, merge_lora, split_lora

__all__ = ["load_model", "LoRAConfig", "split_lora", "merge_lora", "count_lora_params", "ModelConfig", "PRESETS",
           "GPT", "JaxloraError", "ConfigError", "DataError", "CheckpointError"]
