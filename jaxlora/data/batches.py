"""Deterministic, resumable batches of tokenized examples, one global batch per optimizer step.

``BatchIterator`` yields, forever, ``{"input_ids": int32 [local_batch, length], "labels": int32
[local_batch, length], "segment_ids": int32 [local_batch, length]}`` where ``local_batch =
global_batch_size / process_count``; segment_ids are 1 on an example's tokens and 0 on padding, or,
for packed rows (`data.packed`), the rows' own (1, 2, ... per example):

* Order: epoch ``e`` visits the examples in a permutation drawn from ``(seed, e)`` (or in order
  with ``shuffle=False``); batch ``i`` of the epoch is permutation entries
  ``[i * global_batch_size, (i + 1) * global_batch_size)``. Process ``p`` gets rows
  ``[p * local_batch, (p + 1) * local_batch)`` of that global batch. Every process must hold the
  same dataset (tokenize it on every host).
* Resume: ``position()`` is ``{"epoch", "index", "seed"}`` of the *next* batch; a new iterator
  built with those values yields exactly the batches this one would have yielded next. Store it
  with the checkpoint.
* Padding: right padding, ``pad_id`` in ``input_ids`` and ``ignore_index`` in ``labels``.
  Examples longer than the row are cut. By default every batch is ``seq_len`` wide, so the jitted
  train step compiles once. ``length_bucket=N`` instead rounds each batch up to its longest
  example (over the *global* batch, so all processes agree) to a multiple of ``N``, capped at
  ``seq_len``: less padding, at most ``ceil(seq_len / N)`` shapes to compile.
  ``padding_fraction`` reports the padded share of the tokens yielded so far.
* Epoch end: ``drop_last=True`` skips the incomplete last batch (LitGPT's training loader keeps
  it; a fixed global batch keeps the step shape and the token count per step constant). With
  ``drop_last=False`` the last batch is filled up with rows that are all padding (labels all
  ``ignore_index``, so they add nothing to the loss).

``eval_batches`` walks a validation split once, in order, without dropping any example.

Typical use::

    train, val = load_sft_splits(cfg.data, tokenizer, cfg.train.max_seq_length)
    seq_len = effective_seq_length(train + val, cfg.train.max_seq_length)
    position = saved_position or {"epoch": 0, "index": 0, "seed": cfg.data.seed}
    batches = BatchIterator(train, global_batch_size, seq_len=seq_len, pad_id=tokenizer.pad_id, **position)
    batch = next(batches)  # reshape [local_batch, seq] to [accum, micro, seq] for accumulation
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from jaxlora.errors import ConfigError, DataError

Example = dict[str, np.ndarray]
Batch = dict[str, np.ndarray]
_PAD_ROW = -1


def steps_per_epoch(num_examples: int, global_batch_size: int, drop_last: bool = True) -> int:
    """Optimizer steps (global batches) in one pass over ``num_examples``."""
    if drop_last:
        return num_examples // global_batch_size
    return math.ceil(num_examples / global_batch_size)


class BatchIterator:
    """Infinite iterator of training batches; see the module docstring for order, padding and resume."""

    def __init__(
        self,
        dataset: Sequence[Example],
        global_batch_size: int,
        seed: int,
        seq_len: int,
        pad_id: int | None,
        ignore_index: int = -100,
        epoch: int = 0,
        index: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        length_bucket: int | None = None,
    ) -> None:
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise ConfigError(
                f"The global batch size {global_batch_size} must be a positive multiple of the "
                f"process count {process_count}."
            )
        if not 0 <= process_index < process_count:
            raise ConfigError(f"The process index {process_index} is outside [0, {process_count}).")
        if seq_len <= 0 or (length_bucket is not None and length_bucket <= 0):
            raise ConfigError(f"seq_len ({seq_len}) and length_bucket ({length_bucket}) must be positive.")
        if seed < 0 or epoch < 0:
            raise ConfigError(f"The data seed ({seed}) and epoch ({epoch}) must not be negative.")
        if not dataset:
            raise DataError("The dataset to batch is empty.")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.seed, self.epoch, self.index = seed, epoch, index
        self.seq_len = seq_len
        self.pad_id = 0 if pad_id is None else pad_id
        self.ignore_index = ignore_index
        self.process_index = process_index
        self.shuffle, self.drop_last, self.length_bucket = shuffle, drop_last, length_bucket
        self.steps_per_epoch = steps_per_epoch(len(dataset), global_batch_size, drop_last)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"The dataset has {len(dataset)} examples, fewer than one global batch of {global_batch_size}."
            )
        if not 0 <= index < self.steps_per_epoch:
            raise ConfigError(
                f"The data position index {index} is outside an epoch of {self.steps_per_epoch} batches; "
                "the dataset or the global batch size changed since it was saved."
            )
        # Example lengths as they will be placed in a row (cut at seq_len); a packed row's: its tokens
        self._lengths = np.minimum([int((e["segment_ids"] > 0).sum()) if "segment_ids" in e else len(e["input_ids"])
                                    for e in dataset], seq_len)
        self._order_epoch: int | None = None
        self._order = np.empty(0, dtype=np.int64)
        self._total_tokens = 0
        self._padded_tokens = 0

    def position(self) -> dict[str, int]:
        """Where the next batch comes from: pass these to a new iterator to continue from here."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    @property
    def padding_fraction(self) -> float:
        """Share of padded positions in the batches this process has yielded (0.0 before the first)."""
        return self._padded_tokens / self._total_tokens if self._total_tokens else 0.0

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.dataset)
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def _global_rows(self, epoch: int, index: int) -> np.ndarray:
        """Example indices of the global batch ``index`` of ``epoch``; ``_PAD_ROW`` fills a short last batch."""
        rows = self._epoch_order(epoch)[index * self.global_batch_size : (index + 1) * self.global_batch_size]
        missing = self.global_batch_size - len(rows)
        return np.concatenate([rows, np.full(missing, _PAD_ROW)]) if missing else rows

    def _batch_length(self, rows: np.ndarray) -> int:
        if self.length_bucket is None:
            return self.seq_len
        longest = int(self._lengths[rows[rows != _PAD_ROW]].max())
        return min(self.seq_len, -(-longest // self.length_bucket) * self.length_bucket)

    def epoch_padding_fraction(self, epoch: int | None = None) -> float:
        """Share of padded positions over all global batches of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        total = padded = 0
        for index in range(self.steps_per_epoch):
            rows = self._global_rows(epoch, index)
            width = self._batch_length(rows)
            total += len(rows) * width
            padded += len(rows) * width - int(np.minimum(self._lengths[rows[rows != _PAD_ROW]], width).sum())
        return padded / total

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        global_rows = self._global_rows(self.epoch, self.index)
        width = self._batch_length(global_rows)
        start = self.process_index * self.local_batch_size
        local_rows = global_rows[start : start + self.local_batch_size]
        input_ids = np.full((self.local_batch_size, width), self.pad_id, dtype=np.int32)
        labels = np.full((self.local_batch_size, width), self.ignore_index, dtype=np.int32)
        segment_ids = np.zeros((self.local_batch_size, width), dtype=np.int32)
        for row, example_index in enumerate(local_rows):
            if example_index == _PAD_ROW:
                continue
            example = self.dataset[example_index]
            n = min(len(example["input_ids"]), width)
            input_ids[row, :n] = example["input_ids"][:n]
            labels[row, :n] = example["labels"][:n]
            segment_ids[row, :n] = example["segment_ids"][:n] if "segment_ids" in example else 1
        self._total_tokens += input_ids.size
        self._padded_tokens += int((segment_ids == 0).sum())
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids}


def eval_batches(
    dataset: Sequence[Example],
    batch_size: int,
    seq_len: int,
    pad_id: int | None,
    ignore_index: int = -100,
    max_iters: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    length_bucket: int | None = None,
) -> Iterator[Batch]:
    """The first ``max_iters`` (None: all) batches of ``dataset`` in order, like ``BatchIterator`` batches.

    ``batch_size`` is the global batch size; the last batch is filled up with padding rows.
    """
    batches = BatchIterator(
        dataset,
        batch_size,
        seed=0,
        seq_len=seq_len,
        pad_id=pad_id,
        ignore_index=ignore_index,
        process_index=process_index,
        process_count=process_count,
        shuffle=False,
        drop_last=False,
        length_bucket=length_bucket,
    )
    count = batches.steps_per_epoch if max_iters is None else min(max_iters, batches.steps_per_epoch)
    for _ in range(count):
        yield next(batches)
