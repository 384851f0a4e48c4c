"""LitGPT config_hub/finetune/gemma-7b/lora.yaml: Gemma 7B, LoRA on every linear layer, Alpaca2k.

LitGPT writes to out/finetune/qlora-gemma-7b (a slip in its lora.yaml); this recipe uses lora-gemma-7b.
"""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe(
        "checkpoints/google/gemma-7b", "out/finetune/lora-gemma-7b", all_targets=True, lora_r=16, lora_dropout=0.1,
        micro_batch_size=1, global_batch_size=6, epochs=2, lr_warmup_steps=200, save_interval=800, eval_interval=25,
    )
