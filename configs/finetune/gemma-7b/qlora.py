"""LitGPT config_hub/finetune/gemma-7b/qlora.yaml: Gemma 7B, QLoRA (bnb.nf4) on every linear layer, Alpaca2k."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe(
        "checkpoints/google/gemma-7b", "out/finetune/qlora-gemma-7b", quantize="bnb.nf4",
        all_targets=True, lora_r=16, lora_dropout=0.1,
        micro_batch_size=1, global_batch_size=6, epochs=2, lr_warmup_steps=200, save_interval=800, eval_interval=25,
    )
