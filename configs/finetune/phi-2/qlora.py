"""LitGPT config_hub/finetune/phi-2/qlora.yaml: Phi-2, QLoRA (bnb.nf4) on every linear layer, Alpaca2k."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe(
        "checkpoints/microsoft/phi-2", "out/finetune/qlora-phi-2", quantize="bnb.nf4",
        all_targets=True, lora_r=8, micro_batch_size=4, epochs=1, save_interval=800,
    )
