"""Sequence packing: tokenized examples concatenated into rows of `seq_len`, each a sequence of segments.

A packed row is an example of `batches.BatchIterator` with one more array:

    input_ids   int32 [seq_len]  the examples' tokens back to back, then `pad_id`
    labels      int32 [seq_len]  their labels, with each example's FIRST label set to `ignore_index`
    segment_ids int32 [seq_len]  1, 2, ... per example, 0 for the padding at the end

The model confines attention to each segment and restarts positions in each (`GPT.hidden_states`);
position i predicts label i + 1, and a segment's first label is never a target of its own example
(nothing precedes it), so ignoring it stops the previous example from predicting it: the loss and
its gradients over a packed batch equal those over the same examples unpacked.

Rows are built once per run, deterministically from the data seed: the examples in a seeded
random order, taken in windows of `window`, each window packed first-fit decreasing (longest
first, into the first row with room). The batch iterator then shuffles rows per epoch, so the
step count per epoch is fixed and a saved data position restores the exact packed stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxlora.errors import DataError

Example = dict[str, np.ndarray]
WINDOW = 1024  # examples packed together: larger fills rows better, smaller keeps more of the shuffle


def pack_examples(examples: Sequence[Example], seq_len: int, *, seed: int, pad_id: int | None,
                  ignore_index: int = -100, window: int = WINDOW) -> list[Example]:
    """The packed rows of `examples` (see the module docstring). Examples must fit a row (cut them first)."""
    lengths = np.array([len(e["input_ids"]) for e in examples])
    if len(lengths) and lengths.max() > seq_len:
        raise DataError(f"an example of {lengths.max()} tokens does not fit a packed row of {seq_len}; "
                        "cut examples to max_seq_length before packing")
    order = np.random.default_rng([seed, 0x9ACC]).permutation(len(examples))
    rows: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        free = np.empty(0, dtype=np.int64)  # room left in each row of this window
        members: list[list[int]] = []
        for i in chunk:
            fits = np.flatnonzero(free >= lengths[i])
            if fits.size:
                free[fits[0]] -= lengths[i]
                members[fits[0]].append(int(i))
            else:
                free = np.append(free, seq_len - lengths[i])
                members.append([int(i)])
        rows.extend(members)
    return [_row([examples[i] for i in row], seq_len, 0 if pad_id is None else pad_id, ignore_index) for row in rows]


def _row(parts: list[Example], seq_len: int, pad_id: int, ignore_index: int) -> Example:
    input_ids = np.full(seq_len, pad_id, np.int32)
    labels = np.full(seq_len, ignore_index, np.int32)
    segment_ids = np.zeros(seq_len, np.int32)
    at = 0
    for k, example in enumerate(parts, start=1):
        n = len(example["input_ids"])
        input_ids[at:at + n] = example["input_ids"]
        labels[at:at + n] = example["labels"]
        labels[at] = ignore_index
        segment_ids[at:at + n] = k
        at += n
    return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids}


def packing_efficiency(rows: Sequence[Example]) -> float:
    """Share of the rows' positions that hold example tokens."""
    total = sum(len(r["segment_ids"]) for r in rows)
    return sum(int((r["segment_ids"] > 0).sum()) for r in rows) / total if total else 0.0
