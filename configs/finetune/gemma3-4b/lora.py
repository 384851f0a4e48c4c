"""Gemma 3 4B (pretrained; its text model: the checkpoint is the vision-language `gemma3`), LoRA on every
linear layer, Alpaca2k: the gemma-7b recipe's settings (LitGPT's config hub has no Gemma 3 recipe)."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe(
        "checkpoints/google/gemma-3-4b-pt", "out/finetune/lora-gemma3-4b", all_targets=True, lora_r=16,
        lora_dropout=0.1, micro_batch_size=1, global_batch_size=6, epochs=2, lr_warmup_steps=200, save_interval=800,
        eval_interval=25,
    )
