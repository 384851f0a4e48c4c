"""OLMo 2 1B (0425), LoRA on query and value, Alpaca2k: the llama-3.2-1B recipe's settings (LitGPT's
config hub has no OLMo 2 recipe)."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe("checkpoints/allenai/OLMo-2-0425-1B", "out/finetune/lora-olmo2-1b", micro_batch_size=1, epochs=2)
