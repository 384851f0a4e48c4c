"""LitGPT config_hub/finetune/llama-3.2-3B/lora.yaml: Llama 3.2 3B, LoRA on query and value, Alpaca2k."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe(
        "checkpoints/meta-llama/Llama-3.2-3B", "out/finetune/lora-llama-3.2-3B",
        micro_batch_size=1, epochs=2,
    )
