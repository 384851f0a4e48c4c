"""Gemma 3 1B (pretrained, text), LoRA on every linear layer, Alpaca2k: the gemma2-2b recipe's settings
(LitGPT's config hub has no Gemma 3 recipe)."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe(
        "checkpoints/google/gemma-3-1b-pt", "out/finetune/lora-gemma3-1b", all_targets=True, lora_r=8, lora_dropout=0.1,
        micro_batch_size=2, global_batch_size=6, epochs=2, lr_warmup_steps=200, save_interval=800, eval_interval=25,
    )
