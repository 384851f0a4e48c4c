"""Text generation with a preallocated KV cache: greedy or sampled, batched, with stop sequences.

A batch of prompts is left-padded to a bucketed length P (a multiple of `prompt_bucket`) so the
last prompt token of every row sits in the same slot; the cache holds P + max_new_tokens slots.
One jitted function prefills the prompts and then runs a `lax.while_loop` of single-token steps
until every row has stopped or max_new_tokens are generated: it compiles once per (batch size,
P, max_new_tokens, sampling settings, count and longest length of the stop sequences) and never
per token. `stream` runs the same
prefill and step functions one token at a time from Python, for interactive output.

A row stops at the first stop sequence (the tokenizer's EOS ids and the prompt style's stop
sequences, see `PromptStyle.stop_tokens`) that its generated tokens end with; the stop sequence
is not part of the answer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.errors import ConfigError
from jaxlora.models.gpt import GPT, KVCache

StopTokens = tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (argmax); else softmax(logits / temperature) restricted to the `top_k`
    most likely tokens (None: all) and to the smallest set whose probability reaches `top_p`
    (None or 1: all), applied in that order."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling, vocab_size: int) -> jax.Array:
    """logits fp32 [b, padded_vocab] -> token ids int32 [b]; columns >= vocab_size are never drawn."""
    logits = logits[:, :vocab_size].astype(jnp.float32)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < vocab_size:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p  # the most likely token always stays
        smallest_kept = jnp.take_along_axis(ordered, jnp.sum(keep, axis=-1, keepdims=True) - 1, axis=-1)
        logits = jnp.where(logits < smallest_kept, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def stop_array(stop_tokens: StopTokens) -> np.ndarray:
    """Stop sequences -> int32 [n, longest] (at least [0, 1]), each right-aligned, -1 before it."""
    stops = [tuple(int(t) for t in seq) for seq in stop_tokens if len(seq)]
    out = np.full((len(stops), max((len(q) for q in stops), default=1)), -1, np.int32)
    for row, seq in enumerate(stops):
        out[row, out.shape[1] - len(seq):] = seq
    return out


@flax.struct.dataclass
class DecodeState:
    """The loop carry. tokens int32 [b, max_new_tokens] (0 after a row stops); token int32 [b]: the
    latest one, fed next; step int32 []: tokens generated; done bool [b]; length int32 [b]: answer
    tokens (stop sequence excluded); stops int32 [n, L] (`stop_array`); recent int32 [b, L]: the
    last L generated tokens (-1 before the first); prompt, prompt_mask int32 [b, P]: the prompts as
    prefilled (to prefill again, see `_step`)."""

    cache: KVCache
    prompt: jax.Array
    prompt_mask: jax.Array
    stops: jax.Array
    tokens: jax.Array
    token: jax.Array
    step: jax.Array
    done: jax.Array
    length: jax.Array
    recent: jax.Array
    key: jax.Array


def _record(s: DecodeState, token: jax.Array) -> DecodeState:
    """Append `token` [b] (0 in stopped rows) and detect stop sequences (the longest match is cut)."""
    token = jnp.where(s.done, 0, token)
    recent = jnp.concatenate([s.recent[:, 1:], token[:, None]], axis=1)
    used = s.stops >= 0  # [n, L]
    hit = jnp.all((recent[:, None, :] == s.stops[None]) | ~used[None], axis=-1)  # [b, n]
    stop_len = jnp.max(jnp.where(hit, jnp.sum(used, axis=1), 0), axis=1, initial=0).astype(jnp.int32)
    stopping = ~s.done & (stop_len > 0)
    length = jnp.where(s.done, s.length, s.step + 1 - stop_len)
    return s.replace(tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.step, axis=1),
                     token=token, step=s.step + 1, done=s.done | stopping, length=length, recent=recent)


def _prefill(model: GPT, ids, mask, stops, key, *, max_new_tokens: int, sampling: Sampling,
             cache_dtype) -> DecodeState:
    """Run the prompts ids/mask int32 [b, P] into a fresh cache and draw the first token."""
    b, p = ids.shape
    cache = model.init_cache(b, p + max_new_tokens, cache_dtype)
    logits, cache = model.forward_with_cache(ids, cache, attention_mask=mask, last_only=True)
    s = DecodeState(cache=cache, prompt=ids, prompt_mask=mask, stops=stops, tokens=jnp.zeros((b, max_new_tokens), jnp.int32),
                    token=jnp.zeros((b,), jnp.int32), step=jnp.zeros((), jnp.int32), done=jnp.zeros((b,), bool),
                    length=jnp.zeros((b,), jnp.int32), recent=jnp.full((b, stops.shape[1]), -1, jnp.int32), key=key)
    return _record(s, sample(logits[:, -1], jax.random.fold_in(key, 0), sampling, model.config.vocab_size))


def _step(model: GPT, s: DecodeState, *, sampling: Sampling) -> DecodeState:
    """Feed the latest token through the cache and draw the next one.

    longrope switches from its short to its long factors once the sequence is longer than
    original_max_position_embeddings; everything cached before was computed with the short ones, so
    at that step the whole sequence is prefilled again (as transformers' Phi-3 generation does) and
    each step's logits stay those of the full forward over the sequence so far.
    """
    scaling = dict(model.config.rope_scaling or ())
    if scaling.get("rope_type") != "longrope":
        logits, cache = model.forward_with_cache(s.token[:, None], s.cache)
    else:
        position = jnp.max(jnp.sum(s.cache.valid, axis=1))  # of the token fed now, in the longest row
        logits, cache = jax.lax.cond(position == scaling["original_max_position_embeddings"], _prefill_again,
                                     lambda model, s: model.forward_with_cache(s.token[:, None], s.cache), model, s)
    token = sample(logits[:, -1], jax.random.fold_in(s.key, s.step), sampling, model.config.vocab_size)
    return _record(s.replace(cache=cache), token)


def _prefill_again(model: GPT, s: DecodeState) -> tuple[jax.Array, KVCache]:
    """The prompts and every token generated so far (the latest one included) through a fresh cache ->
    (logits [b, 1, padded_vocab] of the latest token, the cache as if it had been built step by step)."""
    b, p = s.prompt.shape
    n = s.tokens.shape[1]
    ids = jnp.concatenate([s.prompt, s.tokens], axis=1)  # [b, p + n]; tokens[:, :step] are fed so far
    mask = jnp.concatenate([s.prompt_mask, jnp.broadcast_to(jnp.arange(n) < s.step, (b, n)).astype(jnp.int32)], 1)
    logits, cache = model.forward_with_cache(ids, model.init_cache(b, p + n, s.cache.k.dtype), attention_mask=mask)
    last = p + s.step - 1  # the latest token's slot; the masked slots after it are filled by later steps
    return jax.lax.dynamic_slice_in_dim(logits, last, 1, axis=1), cache.replace(index=last + 1)


_STATIC = ("graphdef", "max_new_tokens", "sampling", "cache_dtype")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate(params, ids, mask, stops, key, *, graphdef, max_new_tokens, sampling, cache_dtype):
    s = _prefill(nnx.merge(graphdef, params), ids, mask, stops, key, max_new_tokens=max_new_tokens,
                 sampling=sampling, cache_dtype=cache_dtype)
    s = jax.lax.while_loop(lambda s: (s.step < max_new_tokens) & ~jnp.all(s.done),
                           lambda s: _step(nnx.merge(graphdef, params), s, sampling=sampling), s)
    return s.tokens, s.length


@functools.partial(jax.jit, static_argnames=_STATIC)
def _prefill_jit(params, ids, mask, stops, key, *, graphdef, max_new_tokens, sampling, cache_dtype):
    return _prefill(nnx.merge(graphdef, params), ids, mask, stops, key, max_new_tokens=max_new_tokens,
                    sampling=sampling, cache_dtype=cache_dtype)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("s",))
def _step_jit(params, s, *, graphdef, sampling):
    return _step(nnx.merge(graphdef, params), s, sampling=sampling)


def left_pad(prompts: Sequence[Sequence[int]], bucket: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (ids, mask) int32 [n, P], right-aligned; P = the longest prompt rounded up to `bucket`."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ConfigError("every prompt needs at least one token")
    width = -(-max(len(p) for p in prompts) // bucket) * bucket
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = np.asarray(p, np.int32)
        mask[row, width - len(p):] = 1
    return ids, mask


def _check_length(model: GPT, prompt_len: int, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    context = model.config.block_size
    if prompt_len + max_new_tokens > context:
        raise ConfigError(f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                          f"model's context of {context} tokens; shorten the prompt or lower max_new_tokens")


def _settings(model: GPT, max_new_tokens, sampling, cache_dtype) -> tuple[nnx.State, dict]:
    graphdef, params = nnx.split(model)
    static = dict(graphdef=graphdef, max_new_tokens=max_new_tokens, sampling=sampling,
                  cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype))
    return params, static


def generate(model: GPT, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: Sampling = Sampling(),
             stop_tokens: StopTokens = (), key: jax.Array | None = None, prompt_bucket: int = 32,
             cache_dtype=None) -> list[np.ndarray]:
    """Generated token ids (int32 [n_i], stop sequence removed) for each prompt (token ids).

    key: the sampling key (default `jax.random.key(0)`; unused when greedy). cache_dtype: the
    KV cache's dtype (default the model's compute dtype).
    """
    ids, mask = left_pad(prompts, prompt_bucket)
    _check_length(model, max(len(p) for p in prompts), max_new_tokens)
    params, static = _settings(model, max_new_tokens, sampling, cache_dtype)
    key = jax.random.key(0) if key is None else key
    tokens, lengths = jax.device_get(_generate(params, ids, mask, stop_array(stop_tokens), key, **static))
    return [tokens[i, :lengths[i]] for i in range(len(prompts))]


def stream(model: GPT, prompt: Sequence[int], *, max_new_tokens: int, sampling: Sampling = Sampling(),
           stop_tokens: StopTokens = (), key: jax.Array | None = None, prompt_bucket: int = 32,
           cache_dtype=None) -> Iterator[int]:
    """Yield the answer's token ids one by one as they are generated (one prompt).

    The same prefill and step as `generate` (the same tokens for the same key), each step a jitted
    call whose token is fetched before the next one. Tokens that could still begin a stop sequence
    are held back until that is decided; the stop sequence itself is never yielded.
    """
    ids, mask = left_pad([prompt], prompt_bucket)
    _check_length(model, len(prompt), max_new_tokens)
    params, static = _settings(model, max_new_tokens, sampling, cache_dtype)
    key = jax.random.key(0) if key is None else key
    stops = stop_array(stop_tokens)
    hold = stops.shape[1] - 1
    s = _prefill_jit(params, ids, mask, stops, key, **static)
    pending: list[int] = []
    while True:
        token, done, length, step = (int(x) for x in jax.device_get((s.token[0], s.done[0], s.length[0], s.step)))
        pending.append(token)
        if done or step >= max_new_tokens:
            yield from pending[:len(pending) - (step - length)]  # drop the stop sequence
            return
        while len(pending) > hold:
            yield pending.pop(0)
        s = _step_jit(params, s, graphdef=static["graphdef"], sampling=sampling)
