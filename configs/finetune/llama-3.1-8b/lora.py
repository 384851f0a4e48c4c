"""LitGPT config_hub/finetune/llama-3.1-8b/lora.yaml: Llama 3.1 8B, LoRA on query and value, Alpaca2k."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe(
        "checkpoints/meta-llama/Meta-Llama-3.1-8B", "out/finetune/lora-llama-3.1-8b",
        micro_batch_size=1, epochs=2,
    )
