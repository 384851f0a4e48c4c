"""jaxlora.data: tokenizers, prompt styles, instruction datasets and batching.

``tokenizer`` (Tokenizer), ``prompts`` (PromptStyle), ``sources`` (records from local files and
named downloadable sets), ``download`` (cached atomic downloads), ``sft`` (tokenized examples,
``load_sft_splits``), ``batches`` (``BatchIterator``, ``eval_batches``).
"""

from jaxlora.data.batches import BatchIterator, eval_batches, steps_per_epoch
from jaxlora.data.prompts import PromptStyle, prompt_style_for_model
from jaxlora.data.sft import effective_seq_length, load_sft_splits, tokenize_records
from jaxlora.data.tokenizer import Tokenizer

__all__ = [
    "BatchIterator",
    "PromptStyle",
    "Tokenizer",
    "effective_seq_length",
    "eval_batches",
    "load_sft_splits",
    "prompt_style_for_model",
    "steps_per_epoch",
    "tokenize_records",
]
