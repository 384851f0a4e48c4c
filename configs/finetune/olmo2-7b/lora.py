"""OLMo 2 7B (1124), LoRA on query and value, Alpaca2k: the llama-2-7b recipe's settings (LitGPT's
config hub has no OLMo 2 recipe)."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe("checkpoints/allenai/OLMo-2-1124-7B", "out/finetune/lora-olmo2-7b", micro_batch_size=1, epochs=2)
