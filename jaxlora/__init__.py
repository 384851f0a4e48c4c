"""jaxlora: LoRA finetuning of GPT-style language models in pure JAX/Flax."""
