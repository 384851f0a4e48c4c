"""Sample answers: greedy generations for the first validation prompts while training.

`finetune` makes one `Sampler` when `eval.max_new_tokens` is set and there is validation data.
At each validation it logs the answer to the first prompt (as LitGPT's generate_example); before
training (with the initial validation) and after it, it answers all of them, logs them side by
side and writes `<out_dir>/samples.json`. A prompt is the record's instruction (and input) in the
run's prompt style; the reference answer is the record's output.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import jax
from flax import nnx

from jaxlora import storage
from jaxlora.data import Tokenizer
from jaxlora.data.prompts import PromptStyle
from jaxlora.data.sources import Record
from jaxlora.generate import generate

log = logging.getLogger(__name__)

COUNT = 3  # validation records sampled


class Sampler:
    """Greedy answers to the prompts of the first `count` `records` for several LoRA states.

    Prompts whose tokens plus `max_new_tokens` exceed `max_seq_length` are left out.
    """

    def __init__(self, graphdef, base, records: Sequence[Record], style: PromptStyle, tokenizer: Tokenizer, *,
                 max_new_tokens: int, max_seq_length: int, count: int = COUNT):
        self.graphdef, self.base, self.tokenizer = graphdef, base, tokenizer
        self.stop_tokens = style.stop_tokens(tokenizer)
        self.max_new_tokens = max_new_tokens
        self.samples = []  # {"instruction", "prompt", "expected", "ids"}
        for record in records[:count]:
            prompt = style.apply(record["instruction"], input=record.get("input", ""))
            ids = tokenizer.encode(prompt)
            if len(ids) + max_new_tokens <= max_seq_length:
                self.samples.append({"instruction": record["instruction"], "prompt": prompt,
                                     "expected": record["output"], "ids": ids})
        if records and not self.samples:
            log.info("no sample answers: the prompts plus eval.max_new_tokens (%d) exceed the sequence length %d",
                     max_new_tokens, max_seq_length)
        self.generated: dict[str, list[str]] = {}

    def _answers(self, lora) -> list[str]:
        """Greedy answers to every prompt (always the same batch: one compiled generation serves all calls)."""
        model = nnx.merge(self.graphdef, lora, self.base)
        outputs = generate(model, [s["ids"] for s in self.samples], max_new_tokens=self.max_new_tokens,
                           stop_tokens=self.stop_tokens)
        return [self.tokenizer.decode(o) for o in outputs]

    def at_validation(self, lora, step: int) -> None:
        """Log the answer to the first prompt of the model with LoRA params `lora` (the `fit` hook)."""
        if self.samples:
            log.info("step %d sample answer to %r: %r", step, self.samples[0]["instruction"], self._answers(lora)[0])

    def generate(self, when: str, lora) -> None:
        """Greedy answers to every prompt of the model with LoRA params `lora`, kept under the name `when`."""
        if self.samples:
            self.generated[when] = self._answers(lora)

    def write(self, out_dir: str | os.PathLike) -> list[dict]:
        """Log the samples and write `<out_dir>/samples.json` (process 0); returns them.

        The log shows each prompt without the lines that all sample prompts share (the preamble).
        """
        samples = [{"prompt": s["prompt"], "expected": s["expected"],
                    **{when: texts[i] for when, texts in self.generated.items()}}
                   for i, s in enumerate(self.samples)]
        if jax.process_index() != 0 or not samples:
            return samples
        prompts = [s["prompt"] for s in samples]
        shared = os.path.commonprefix(prompts) if len(prompts) > 1 else ""
        shared = shared[:shared.rfind("\n") + 1]
        for i, sample in enumerate(samples, 1):
            lines = [f"sample {i}: {sample['prompt'][len(shared):].strip()!r}",
                     f"  expected: {sample['expected']!r}"]
            lines += [f"  {when + ':':<9} {sample[when]!r}" for when in self.generated]
            log.info("\n".join(lines))
        storage.write_text(storage.path(out_dir) / "samples.json", json.dumps(samples, indent=2) + "\n")
        return samples
