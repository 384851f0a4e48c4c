"""`jaxlora merge` and `jaxlora export-peft`: a trained adapter out as an HF checkpoint or a PEFT adapter.

Heavy imports (jax, the model) happen inside the commands, so `jaxlora --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxlora import storage
from jaxlora.errors import CheckpointError, ConfigError

MERGE_DTYPES = ("float32", "bfloat16", "float16")


class CommandParser(argparse.ArgumentParser):
    """argparse whose mistakes raise ConfigError (the CLI's one-line `error: ...`, exit code 2).

    No abbreviations: a misspelt flag is an error, not silently another flag (--prompt is not --prompt_style).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise ConfigError(f"jaxlora {self.prog.split()[-1]}: {message}")


def _parse(name: str, argv: Sequence[str], *, dtype_help: str) -> argparse.Namespace:
    p = CommandParser(prog=f"jaxlora {name}")
    p.add_argument("--checkpoint_dir", required=True, help="the base HF checkpoint directory")
    p.add_argument("--adapter", required=True,
                   help="a finetune out_dir (final/lora.safetensors), a lora.safetensors file, or a PEFT adapter dir")
    p.add_argument("--out", required=True, help="the output directory: new or empty, outside --checkpoint_dir and --adapter")
    if dtype_help:
        p.add_argument("--dtype", default=None, help=dtype_help)
        p.add_argument("--quantize", default=None,
                       help="merge into the weights as quantized (bnb.nf4, ...) and dequantised, or none: the "
                            "full-precision weights (default: the quantization the run trained on, else none)")
    args = p.parse_args(list(argv))
    _check_out(args)
    return args


def _check_out(args: argparse.Namespace) -> None:
    """Before anything is loaded or written: --out is a new or empty directory, neither an input nor inside one."""
    from jaxlora.checkpoints.hf_export import check_output_directory

    out = Path(args.out).resolve()
    # an adapter named by its file: that file cannot be the output (a new or empty directory)
    for flag, path in (("--checkpoint_dir", Path(args.checkpoint_dir)), ("--adapter", Path(args.adapter))):
        if path.is_dir() and (out == path.resolve() or path.resolve() in out.parents):
            where = "is" if out == path.resolve() else "lies inside"
            raise ConfigError(f"--out {args.out} {where} the {flag} directory {path}, an input that must stay as it "
                              f"is; choose an output directory outside it")
    check_output_directory(args.out)


def merge(argv: Sequence[str]) -> None:
    """Fold a LoRA adapter into the base weights and write an HF checkpoint directory."""
    args = _parse("merge", argv, dtype_help="stored dtype of the merged weights (default: the base checkpoint's)")
    from jaxlora.checkpoints.adapters import load_with_adapter
    from jaxlora.checkpoints.hf_export import TOKENIZER_FILES, save_hf_checkpoint
    from jaxlora.models.lora import merge_lora

    base = storage.local_checkpoint(args.checkpoint_dir)  # a URL: mirrored locally
    hf_config = None
    if (base / "config.json").is_file():
        try:
            hf_config = json.loads((base / "config.json").read_text())
        except ValueError as e:
            raise CheckpointError(f"{base / 'config.json'} is not valid JSON ({e})") from None
    dtype = args.dtype or (hf_config or {}).get("torch_dtype") or (hf_config or {}).get("dtype") or "float32"
    if dtype not in MERGE_DTYPES:
        where = "--dtype" if args.dtype else f"the torch_dtype of {base / 'config.json'}"
        raise ConfigError(f"{where} is {dtype!r}, not a dtype merge can write; pass --dtype with one of "
                          f"{', '.join(MERGE_DTYPES)}")
    quantize = _merge_quantize(args)
    # Frozen weights in the output dtype; merge_lora adds A B * scale in fp32 before casting back.
    model = merge_lora(load_with_adapter(base, args.adapter, dtype=dtype, quantize=quantize))
    extra = [base / f for f in TOKENIZER_FILES if (base / f).is_file()]
    out = save_hf_checkpoint(model, args.out, dtype=dtype, hf_config=hf_config, extra_files=extra)
    print(f"merged checkpoint written to {out}")


def _merge_quantize(args: argparse.Namespace) -> str | None:
    """The quantization merge folds the adapter into: --quantize, else the run's (said on stderr)."""
    from jaxlora.checkpoints.adapters import run_config
    from jaxlora.commands.generate import quantize_flag

    given = args.quantize is not None
    quantize = quantize_flag(args.quantize if given else (run_config(args.adapter) or {}).get("quantize"))
    if quantize is not None:
        print(f"merging into the {quantize}-quantized base weights, dequantised (the weights the adapter "
              f"{'was told to use' if given else 'was trained on'}); --quantize=none merges into the "
              "full-precision weights", file=sys.stderr)
    return quantize


def export_peft(argv: Sequence[str]) -> None:
    """Write a LoRA adapter in PEFT's format (adapter_config.json, adapter_model.safetensors)."""
    args = _parse("export-peft", argv, dtype_help="")
    from jaxlora.checkpoints.adapters import read_adapter
    from jaxlora.checkpoints.hf_export import atomic_directory
    from jaxlora.checkpoints.peft import write_peft_adapter
    from jaxlora.models.config import ModelConfig

    config = ModelConfig.from_hf_config(args.checkpoint_dir)
    lora, params = read_adapter(args.checkpoint_dir, args.adapter)
    with atomic_directory(args.out) as tmp:
        write_peft_adapter(config, lora, params, tmp, base_model_name_or_path=str(storage.as_path(args.checkpoint_dir)))
    print(f"PEFT adapter written to {args.out}")
