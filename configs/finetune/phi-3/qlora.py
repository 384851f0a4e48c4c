"""LitGPT config_hub/finetune/phi-3/qlora.yaml: Phi-3 mini 4k instruct, QLoRA (bnb.nf4) on every linear layer, Alpaca2k."""

from jaxlora.config import hub_recipe


def get_config():
    return hub_recipe(
        "checkpoints/microsoft/Phi-3-mini-4k-instruct", "out/finetune/qlora-phi-3", quantize="bnb.nf4",
        all_targets=True, lora_r=8, micro_batch_size=4, epochs=1, save_interval=800,
    )
