"""`jaxlora generate`, `jaxlora chat` and `jaxlora evaluate`: a base checkpoint, optionally with a
trained LoRA adapter, answering prompts or scored on a dataset split.

Sampling defaults are LitGPT's (max_new_tokens 50, temperature 0.8, top_k 50, top_p 1);
`--temperature 0` is greedy. The prompt style defaults to the one the checkpoint's name implies.
When `--adapter` comes from a finetune run (its out_dir or lora.safetensors), the run's precision and
data settings (prompt style, mask_prompt, max_seq_length, ignore_index, the data set and its split)
are the defaults instead, named on stderr; flags override them.
Heavy imports (jax, the model) happen inside the commands, so `jaxlora --help` stays fast.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterable, Sequence

from jaxlora.commands.interop import CommandParser
from jaxlora.errors import ConfigError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint_dir", required=True, help="the base HF checkpoint directory")
    p.add_argument("--adapter", default=None,
                   help="a finetune out_dir, a lora.safetensors file or a PEFT adapter dir (default: the base alone)")
    p.add_argument("--precision", default=None,
                   help="bf16-true, 32-true, ... (default: bf16-true where the backend computes bf16, else 32-true)")
    p.add_argument("--quantize", default=None,
                   help="quantize the base's block weights: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8 or none "
                        "(default: the run's, else none)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max_new_tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=50, help="0: no top-k filter")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--prompt_style", default=None, help="a prompt style name (default: from the checkpoint name)")
    p.add_argument("--seed", type=int, default=1234)


def _run_defaults(args, fields: Sequence[str]) -> dict:
    """{field: value} of the finetune run behind --adapter for the dotted config `fields` (e.g. "data.prompt_style")
    that the command line left unset; printed to stderr. {} when the adapter is not a jaxlora run's."""
    if not args.adapter:
        return {}
    from jaxlora.checkpoints.adapters import run_config

    run = run_config(args.adapter)
    if run is None:
        return {}
    taken = {}
    for field in fields:
        node = run
        for part in field.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            taken[field] = node
    if taken:
        shown = ", ".join(f"{k}={v!r}" for k, v in taken.items())
        print(f"settings of the run that trained {args.adapter} (flags override them): {shown}", file=sys.stderr)
    return taken


def _follow_run(args) -> None:
    """generate / chat: the run behind --adapter gives --precision, --quantize and --prompt_style where unset."""
    fields = (["precision"] * (args.precision is None) + ["quantize"] * (args.quantize is None)
              + ["data.prompt_style"] * (args.prompt_style is None))
    run = _run_defaults(args, fields)
    args.precision = args.precision or run.get("precision")
    args.quantize = args.quantize or run.get("quantize")
    args.prompt_style = args.prompt_style or run.get("data.prompt_style")


def quantize_flag(value: str | None) -> str | None:
    """--quantize's value as a `models.quant` format ("none": None), checked before anything is loaded."""
    from jaxlora.models import quant

    return None if value in (None, "none") else quant.resolve(value)


def _load(args):
    """(model, tokenizer) of --checkpoint_dir [--adapter] in the --precision policy."""
    from jaxlora.checkpoints.hf import load_model
    from jaxlora.data import Tokenizer
    from jaxlora.training.precision import resolve_precision

    policy, _ = resolve_precision(args.precision)
    kwargs = dict(dtype=policy.param_dtype, compute_dtype=policy.compute_dtype, quantize=quantize_flag(args.quantize))
    if args.adapter:
        from jaxlora.checkpoints.adapters import load_with_adapter
        model = load_with_adapter(args.checkpoint_dir, args.adapter, **kwargs)
    else:
        model = load_model(args.checkpoint_dir, **kwargs)
    return model, Tokenizer(args.checkpoint_dir)


def _sampling(args):
    """The Sampling of the flags, checked (with --max_new_tokens) before the model is loaded."""
    from jaxlora.generate import Sampling

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.top_k < 0:
        raise ConfigError(f"--top_k must be >= 0 (0: no top-k filter), got {args.top_k}")
    return Sampling(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)


def _decoding(args, model, tokenizer, sampling):
    """(prompt style, generation kwargs) from the sampling flags."""
    import jax

    from jaxlora.data.sft import resolve_prompt_style

    style = resolve_prompt_style(args.prompt_style, model.config.name)
    return style, dict(max_new_tokens=args.max_new_tokens, sampling=sampling,
                       stop_tokens=style.stop_tokens(tokenizer), key=jax.random.key(args.seed))


def generate(argv: Sequence[str]) -> None:
    """Answer one or more prompts (a batch) with a base model or a finetuned adapter."""
    p = CommandParser(prog="jaxlora generate")
    _model_args(p)
    p.add_argument("--prompt", action="append", default=None,
                   help="an instruction; repeat the flag for a batch (default: 'What food do llamas eat?')")
    _sampling_args(p)
    args = p.parse_args(list(argv))
    from jaxlora.generate import generate as run

    sampling = _sampling(args)
    _follow_run(args)
    quantize_flag(args.quantize)
    model, tokenizer = _load(args)
    style, kwargs = _decoding(args, model, tokenizer, sampling)
    prompts = args.prompt or ["What food do llamas eat?"]
    t0 = time.perf_counter()
    answers = run(model, [tokenizer.encode(style.apply(q)) for q in prompts], **kwargs)
    seconds = time.perf_counter() - t0
    for i, answer in enumerate(answers):
        if len(answers) > 1:
            print(f">> {prompts[i]}")
        print(tokenizer.decode(answer))
    n = sum(len(a) for a in answers)
    print(f"{n} tokens in {seconds:.2f} s, compilation included", file=sys.stderr)


def chat(argv: Sequence[str]) -> None:
    """Chat in the terminal: each message gets a streamed reply (no history; empty line or !quit ends)."""
    p = CommandParser(prog="jaxlora chat")
    _model_args(p)
    _sampling_args(p)
    args = p.parse_args(list(argv))
    from jaxlora.generate import stream

    sampling = _sampling(args)
    _follow_run(args)
    quantize_flag(args.quantize)
    model, tokenizer = _load(args)
    style, kwargs = _decoding(args, model, tokenizer, sampling)
    print("Type a message; an empty line, !quit or !exit ends the chat.", file=sys.stderr)
    while True:
        print(">> Prompt: ", end="", flush=True)
        message = sys.stdin.readline()
        if not message.strip() or message.strip() in ("!quit", "!exit"):
            break
        print(">> Reply: ", end="", flush=True)
        print_streamed(tokenizer, stream(model, tokenizer.encode(style.apply(message.strip())), **kwargs))


def print_streamed(tokenizer, tokens: Iterable[int]) -> None:
    """Print the text of `tokens` as they come: decode all so far and print what is new (a token that
    ends inside a multi-byte character waits for the next one)."""
    ids, shown = [], ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(tokenizer.decode(ids)[len(shown):], flush=True)


def evaluate(argv: Sequence[str]) -> None:
    """Loss and perplexity of a base model or a finetuned adapter on a dataset split."""
    p = CommandParser(prog="jaxlora evaluate",
                epilog="Data flags are the finetune config's data fields, e.g. --data.json_path=FILE "
                       "--data.val_split_fraction=0.1 --data.prompt_style=alpaca --data.mask_prompt=True; "
                       "data.name defaults to json. With the same data flags the val split is finetune's.")
    _model_args(p)
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_seq_length", type=int, default=None, help="truncate examples (default: the model's context)")
    p.add_argument("--max_iters", type=int, default=None, help="evaluate only the first batches (default: all)")
    args, rest = p.parse_known_args(list(argv))
    for flag, value, unset in (("--batch_size", args.batch_size, None), ("--max_iters", args.max_iters, "every batch"),
                               ("--max_seq_length", args.max_seq_length, "the model's context")):
        if value is not None and value < 1:
            hint = f"; leave it out for {unset}" if unset else ""
            raise ConfigError(f"{flag} must be >= 1, got {value}{hint}")
    given = {flag.removeprefix("--").split("=", 1)[0] for flag in rest if flag.startswith("--data.")}
    fields = [f"data.{k}" for k in _RUN_DATA_FIELDS if f"data.{k}" not in given]
    fields += ["train.max_seq_length"] * (args.max_seq_length is None) + ["precision"] * (args.precision is None)
    fields += ["quantize"] * (args.quantize is None)
    run = _run_defaults(args, fields)
    args.precision = args.precision or run.get("precision")
    args.quantize = args.quantize or run.get("quantize")
    quantize_flag(args.quantize)
    data_cfg = _data_config(rest, {k.removeprefix("data."): v for k, v in run.items() if k.startswith("data.")})
    from jaxlora.data import effective_seq_length, eval_batches
    from jaxlora.data.sft import load_sft_records, tokenize_splits
    from jaxlora.models.lora import split_lora
    from jaxlora.training.step import make_eval_step

    records = load_sft_records(data_cfg)  # a data mistake shows before the model is loaded
    model, tokenizer = _load(args)
    context = model.config.block_size
    if args.max_seq_length is not None and args.max_seq_length > context:
        raise ConfigError(f"--max_seq_length={args.max_seq_length} exceeds the model's context of {context} tokens; "
                          f"pass --max_seq_length={context} or less")
    max_seq_length = args.max_seq_length or run.get("train.max_seq_length") or context
    train, val = tokenize_splits(*records, data_cfg, tokenizer, max_seq_length, model_name=model.config.name)
    examples = val if args.split == "val" else train
    if not examples:
        raise ConfigError(f"the {args.split} split is empty; choose --split=train or set --data.val_split_fraction")
    graphdef, lora, base = split_lora(model)
    eval_step = make_eval_step(graphdef)
    batches = eval_batches(examples, args.batch_size, seq_len=effective_seq_length(examples, max_seq_length),
                           pad_id=tokenizer.pad_id, ignore_index=data_cfg.ignore_index, max_iters=args.max_iters,
                           length_bucket=data_cfg.length_bucket)
    loss_sum, tokens, rows = 0.0, 0, 0
    for batch in batches:
        loss, count = eval_step(lora, base, batch)[:2]
        loss_sum, tokens, rows = loss_sum + float(loss), tokens + int(count), rows + len(batch["input_ids"])
    if tokens == 0:
        raise ConfigError(f"the {args.split} split has no labelled tokens to score")
    loss = loss_sum / tokens
    print(f"{args.split} loss {loss:.6g}, perplexity {math.exp(min(loss, 700.0)):.6g} "
          f"({tokens} tokens, {min(rows, len(examples))} examples)")


# the data fields of a finetune run that evaluate takes as its defaults
_RUN_DATA_FIELDS = ("name", "json_path", "val_split_fraction", "mask_prompt", "prompt_style", "ignore_index", "seed",
                    "download_dir", "url", "length_bucket")


def _data_config(flags: Sequence[str], defaults: dict | None = None):
    """The finetune config's `data` section with `defaults` (a run's) and then --data.KEY=VALUE flags applied
    (data.name: json unless a default says otherwise)."""
    from jaxlora.config import apply_overrides, base_config

    cfg = base_config()
    cfg.data.name = "json"
    cfg.data.update(defaults or {})
    overrides, args = [], iter(flags)
    for flag in args:
        if not flag.startswith("--data."):
            raise ConfigError(f"unknown argument {flag!r}; data settings are --data.KEY=VALUE flags")
        if "=" not in flag:
            value = next(args, None)
            if value is None:
                raise ConfigError(f"{flag} needs a value: {flag}=VALUE")
            flag = f"{flag}={value}"
        overrides.append(flag.removeprefix("--"))
    return apply_overrides(cfg, overrides).data
