"""LitGPT config_hub/finetune/llama-2-7b/lora.yaml: Llama 2 7B, LoRA on query and value, Alpaca2k."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe(
        "checkpoints/meta-llama/Llama-2-7b-hf", "out/finetune/lora-llama2-7b",
        micro_batch_size=2, epochs=4,
    )
