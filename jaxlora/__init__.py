"""jaxlora: LoRA finetuning of GPT-style language models in pure JAX/Flax.

    model = jaxlora.load_model(path, dtype="float32", lora=jaxlora.LoRAConfig(r=8, alpha=16, query=True, value=True))
    logits = model(input_ids)   # int32 [batch, seq] -> float32 [batch, seq, padded_vocab]
    graphdef, lora_params, base_params = jaxlora.split_lora(model)
    jaxlora.save_hf_checkpoint(jaxlora.merge_lora(model), out_dir)   # transformers-loadable checkpoint
    jaxlora.save_peft_adapter(model, adapter_dir)                     # peft.PeftModel.from_pretrained(...)
    model = jaxlora.load_with_adapter(path, adapter_dir_or_run_dir)
    answers = jaxlora.generate(model, [prompt_ids], max_new_tokens=50, sampling=jaxlora.Sampling(temperature=0.8))
"""

from jaxlora.checkpoints.adapters import load_with_adapter
from jaxlora.checkpoints.hf import load_model
from jaxlora.checkpoints.hf_export import save_hf_checkpoint
from jaxlora.checkpoints.peft import save_peft_adapter
from jaxlora.errors import CheckpointError, ConfigError, DataError, JaxloraError
from jaxlora.generate import Sampling, generate
from jaxlora.models.config import ModelConfig
from jaxlora.models.families import PRESETS
from jaxlora.models.gpt import GPT
from jaxlora.models.lora import LoRAConfig, count_lora_params, merge_lora, split_lora

__all__ = ["load_model", "load_with_adapter", "save_hf_checkpoint", "save_peft_adapter", "LoRAConfig", "split_lora",
           "merge_lora", "count_lora_params", "generate", "Sampling", "ModelConfig", "PRESETS", "GPT",
           "JaxloraError", "ConfigError", "DataError", "CheckpointError"]
