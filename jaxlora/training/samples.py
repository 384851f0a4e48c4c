"""Sample answers: greedy generations for the first validation prompts, before and after training.

A validation example's prompt is its tokens before the first labelled target, so samples need
masked prompts (`data.mask_prompt=True`); the reference answer is the labelled rest. `finetune`
generates them when `eval.max_new_tokens` is set ("before" only with the initial validation),
logs them and writes `<out_dir>/samples.json`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxlora.data import Tokenizer
from jaxlora.generate import generate

log = logging.getLogger(__name__)

COUNT = 3  # validation examples sampled


def prompt_and_response(example: dict, ignore_index: int = -100) -> tuple[np.ndarray, np.ndarray] | None:
    """(prompt ids, response ids) of a tokenized example, or None when its prompt is not masked."""
    labelled = np.flatnonzero(np.asarray(example["labels"]) != ignore_index)
    if len(labelled) == 0 or labelled[0] == 0:
        return None
    return example["input_ids"][:labelled[0]], example["input_ids"][labelled[0]:]


class Sampler:
    """Generates answers to the prompts of the first `count` `examples` for several LoRA states."""

    def __init__(self, graphdef, base, examples: Sequence[dict], tokenizer: Tokenizer, stop_tokens, *,
                 max_new_tokens: int, ignore_index: int = -100, count: int = COUNT):
        self.graphdef, self.base, self.tokenizer, self.stop_tokens = graphdef, base, tokenizer, stop_tokens
        self.max_new_tokens = max_new_tokens
        pairs = [prompt_and_response(e, ignore_index) for e in examples[:count]]
        if any(p is None for p in pairs):
            log.info("no sample generations: they need masked prompts (data.mask_prompt=True)")
            pairs = []
        self.pairs = pairs
        self.generated: dict[str, list[str]] = {}

    def generate(self, when: str, lora) -> None:
        """Greedy answers of the model with LoRA params `lora`, kept under the name `when`."""
        if not self.pairs:
            return
        model = nnx.merge(self.graphdef, lora, self.base)
        outputs = generate(model, [p for p, _ in self.pairs], max_new_tokens=self.max_new_tokens,
                           stop_tokens=self.stop_tokens)
        self.generated[when] = [self.tokenizer.decode(o) for o in outputs]

    def write(self, out_dir: str | os.PathLike) -> list[dict]:
        """Log the samples and write `<out_dir>/samples.json` (process 0); returns them.

        The log shows each prompt without the lines that all sample prompts share (the preamble).
        """
        prompts = [self.tokenizer.decode(p) for p, _ in self.pairs]
        samples = [{"prompt": prompt, "expected": self.tokenizer.decode(response),
                    **{when: texts[i] for when, texts in self.generated.items()}}
                   for i, (prompt, (_, response)) in enumerate(zip(prompts, self.pairs))]
        if jax.process_index() != 0 or not samples:
            return samples
        shared = os.path.commonprefix(prompts) if len(prompts) > 1 else ""
        shared = shared[:shared.rfind("\n") + 1]
        for i, sample in enumerate(samples, 1):
            lines = [f"sample {i}: {sample['prompt'][len(shared):].strip()!r}",
                     f"  expected: {sample['expected']!r}"]
            lines += [f"  {when + ':':<9} {sample[when]!r}" for when in self.generated]
            log.info("\n".join(lines))
        (Path(out_dir) / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
        return samples
