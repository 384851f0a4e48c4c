"""LitGPT config_hub/finetune/gemma2-2b/lora.yaml: Gemma 2 2B, LoRA on every linear layer, Alpaca2k."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe(
        "checkpoints/google/gemma-2-2b", "out/finetune/lora-gemma-2-2b", all_targets=True, lora_r=8, lora_dropout=0.1,
        micro_batch_size=2, global_batch_size=6, epochs=2, lr_warmup_steps=200, save_interval=800, eval_interval=25,
    )
