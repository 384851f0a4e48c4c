"""Supervised finetuning examples: prompt + response token ids with (optionally masked) labels.

For a record ``{"instruction", "input", "output"}`` and a prompt style::

    prompt    = style.apply(instruction, input=input)
    input_ids = encode(prompt, bos per checkpoint) + encode(output, no bos) + [eos]
    labels    = input_ids, with the prompt positions set to ignore_index if mask_prompt

both truncated to ``max_seq_length``. Labels are not shifted: the loss predicts ``labels[1:]``
from the logits at positions ``[:-1]``, as LitGPT. LitGPT encodes ``prompt + output`` as one
string; encoding the two parts separately (as here) puts the prompt/response boundary exactly
where the mask starts. Examples are dicts of 1-D int32 arrays ``input_ids`` and ``labels``.

``load_sft_splits`` is the entry point the training engine uses: data config in, tokenized
(train, val) examples out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxlora.data.prompts import PromptStyle, prompt_style_for_model
from jaxlora.data.sources import Record, load_json_splits, load_named_splits
from jaxlora.data.tokenizer import Tokenizer
from jaxlora.errors import DataError

logger = logging.getLogger(__name__)

Example = dict[str, np.ndarray]


def tokenize_record(
    record: Record,
    tokenizer: Tokenizer,
    prompt_style: PromptStyle,
    *,
    max_seq_length: int | None = None,
    mask_prompt: bool = False,
    ignore_index: int = -100,
) -> tuple[Example, bool]:
    """One example (int32 ``input_ids``/``labels`` of equal length) and whether it was truncated."""
    prompt = prompt_style.apply(record["instruction"], input=record.get("input", ""))
    prompt_ids = tokenizer.encode(prompt)
    response_ids = tokenizer.encode(record["output"], bos=False, eos=True)
    input_ids = np.concatenate([prompt_ids, response_ids])
    labels = input_ids.copy()
    if mask_prompt:
        labels[: len(prompt_ids)] = ignore_index
    return _truncate({"input_ids": input_ids, "labels": labels}, max_seq_length)


def _truncate(example: Example, max_seq_length: int | None) -> tuple[Example, bool]:
    if max_seq_length is None or not 0 < max_seq_length < len(example["input_ids"]):
        return example, False
    return {k: v[:max_seq_length] for k, v in example.items()}, True


def target_count(labels: np.ndarray, ignore_index: int) -> int:
    """Tokens the loss is computed on: labels[1:] that are not ignored (position 0 predicts nothing)."""
    return int(np.sum(labels[1:] != ignore_index))


def tokenize_records(
    records: Sequence[Record],
    tokenizer: Tokenizer,
    prompt_style: PromptStyle,
    *,
    max_seq_length: int | None = None,
    mask_prompt: bool = False,
    ignore_index: int = -100,
    split_name: str = "train",
) -> list[Example]:
    """Examples of all ``records``. One warning for the split says how many were truncated and how many of
    those lost all or part of their target tokens; DataError when no example keeps a target token (with
    ``mask_prompt`` and prompts longer than ``max_seq_length`` the run would train on nothing)."""
    examples, n_truncated, n_all_cut, n_part_cut = [], 0, 0, 0
    for record in records:
        full, _ = tokenize_record(record, tokenizer, prompt_style, mask_prompt=mask_prompt, ignore_index=ignore_index)
        example, truncated = _truncate(full, max_seq_length)
        examples.append(example)
        before, after = target_count(full["labels"], ignore_index), target_count(example["labels"], ignore_index)
        n_truncated += truncated
        n_all_cut += before > 0 and after == 0
        n_part_cut += 0 < after < before
    if n_truncated:
        logger.warning(
            "%d of %d %s examples are longer than max_seq_length=%d and were truncated: %d of them lost all their "
            "target tokens (no loss from them), %d part of them.",
            n_truncated,
            len(examples),
            split_name,
            max_seq_length,
            n_all_cut,
            n_part_cut,
        )
    if examples and not any(target_count(e["labels"], ignore_index) for e in examples):
        cause = (f"with mask_prompt=True every response starts after max_seq_length={max_seq_length}; raise "
                 "max_seq_length or set mask_prompt=False" if mask_prompt and n_all_cut else
                 "every label is ignored")
        raise DataError(f"no {split_name} example keeps a token to compute the loss on: {cause}")
    return examples


def effective_seq_length(examples: Sequence[Example], max_seq_length: int | None = None) -> int:
    """min(longest example, ``max_seq_length``): the padded batch length.

    LitGPT takes the longest example over train and validation together (``longest_seq_length``).
    """
    longest = max(len(example["input_ids"]) for example in examples)
    if max_seq_length is None or max_seq_length <= 0:
        return longest
    return min(longest, max_seq_length)


def _setting(data_cfg: Any, key: str, default: Any) -> Any:
    """``data_cfg.key`` or ``default`` when the config lacks the field or holds None."""
    value = getattr(data_cfg, key, None)
    return default if value is None else value


def resolve_prompt_style(name: str | None, model_name: str | None) -> PromptStyle:
    """The style called ``name``, or (``name`` None) the one ``model_name`` implies."""
    if name is not None:
        return PromptStyle.from_name(name)
    return prompt_style_for_model(model_name or "")


def load_sft_records(data_cfg: Any) -> tuple[list[Record], list[Record]]:
    """The (train, val) records of a data config, untokenized (fields as in ``load_sft_splits``)."""
    name = str(_setting(data_cfg, "name", "json")).lower()
    seed = int(_setting(data_cfg, "seed", 42))
    val_split_fraction = getattr(data_cfg, "val_split_fraction", None)
    if name == "json":
        return load_json_splits(getattr(data_cfg, "json_path", None), val_split_fraction, seed)
    return load_named_splits(
        name,
        download_dir=_setting(data_cfg, "download_dir", "data"),
        url=getattr(data_cfg, "url", None),
        val_split_fraction=val_split_fraction,
        seed=seed,
    )


def load_sft_splits(
    data_cfg: Any,
    tokenizer: Tokenizer,
    max_seq_length: int | None,
    model_name: str | None = None,
) -> tuple[list[Example], list[Example]]:
    """Tokenized (train, val) examples for a data config.

    ``data_cfg`` (e.g. an ``ml_collections.ConfigDict``) fields; absent or None ones take the default:

    * ``name``: ``"json"`` (local files at ``json_path``) or a named set: ``alpaca``, ``alpaca2k``,
      ``alpacagpt4``, ``dolly``, ``lima`` (needs ``HF_TOKEN``), ``longform``. Default ``"json"``.
    * ``json_path``: a .json/.jsonl file, or a directory with train/val files.
    * ``val_split_fraction``: None = 0.05 for a local file, the dataset's own default for named sets.
    * ``mask_prompt`` (False), ``ignore_index`` (-100), ``seed`` (42).
    * ``prompt_style``: a style name, or None for the style implied by ``model_name``
      (default: the tokenizer's checkpoint directory name).
    * ``download_dir``: cache root for named sets, files land in ``<download_dir>/<name>/`` (``"data"``).
    * ``url``: replaces the named set's download URL.
    """
    return tokenize_splits(*load_sft_records(data_cfg), data_cfg, tokenizer, max_seq_length, model_name)


def tokenize_splits(
    train_records: Sequence[Record],
    val_records: Sequence[Record],
    data_cfg: Any,
    tokenizer: Tokenizer,
    max_seq_length: int | None,
    model_name: str | None = None,
) -> tuple[list[Example], list[Example]]:
    """``load_sft_splits`` for records already loaded (by ``load_sft_records``)."""
    prompt_style = resolve_prompt_style(getattr(data_cfg, "prompt_style", None), model_name or tokenizer.model_name)
    settings = dict(
        max_seq_length=max_seq_length,
        mask_prompt=bool(_setting(data_cfg, "mask_prompt", False)),
        ignore_index=int(_setting(data_cfg, "ignore_index", -100)),
    )
    train = tokenize_records(train_records, tokenizer, prompt_style, split_name="train", **settings)
    val = tokenize_records(val_records, tokenizer, prompt_style, split_name="validation", **settings)
    return train, val
