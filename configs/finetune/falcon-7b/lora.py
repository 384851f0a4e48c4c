"""LitGPT config_hub/finetune/falcon-7b/lora.yaml: Falcon 7B, LoRA on query and value, Alpaca2k."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe("checkpoints/tiiuae/falcon-7b", "out/finetune/lora-falcon-7b", micro_batch_size=1, epochs=4)
