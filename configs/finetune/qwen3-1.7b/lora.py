"""Qwen3 1.7B (base), LoRA on query and value, Alpaca2k: the llama-3.2-1B recipe's settings (LitGPT's
config hub has no Qwen3 recipe), micro-batch 2."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe("checkpoints/Qwen/Qwen3-1.7B-Base", "out/finetune/lora-qwen3-1.7b", micro_batch_size=2, epochs=2)
