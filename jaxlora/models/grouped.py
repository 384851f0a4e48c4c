"""Sparse expert dispatch: token-expert assignments sorted by expert, and grouped matmuls over them.

A top-k MoE layer on n tokens has n * k (token, expert) assignments. `ExpertGroups.sort` orders them
by expert (stable), so the rows for expert e are one contiguous block of `sizes[e]` rows, and
`ExpertGroups.matmul(x [n*k, in], w [E, in, out])` multiplies each block by its own expert's
kernel: n * k rows of work instead of dense dispatch's n * E, with static shapes, no capacity
factor and no dropped token.

Two implementations of the grouped matmul, chosen by backend:
- GPU / TPU: `jax.lax.ragged_dot`, which XLA lowers to a native grouped GEMM there;
- CPU: jax lowers `ragged_dot` to a dense product of every row with every group's kernel (E times
  the work, benchmarks/RESULTS.md), so rows are laid out in tiles of `tile` rows, each group padded
  to whole tiles (at most E * (tile - 1) padding rows), and a `lax.scan` over the tiles multiplies
  each by its expert's kernel: (n * k + padding) rows of work.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

MAX_TILE = 128  # rows per tile of the CPU grouped matmul (smaller when the groups are small)


def tile_rows(rows: int, groups: int) -> int:
    """The CPU tile height for `rows` assignments over `groups` experts: the mean group size rounded up to a
    power of two, between 8 and MAX_TILE (less padding for small batches, full-size dots for large ones)."""
    mean = max(1, -(-rows // groups))
    return min(MAX_TILE, max(8, 1 << (mean - 1).bit_length()))


@flax.struct.dataclass
class ExpertGroups:
    """Rows sorted by expert: `sizes` int32 [E] rows per expert; `expert` int32 [m] each row's expert; the
    CPU layout: `slot` int32 [m] each row's place among the tiles, `tile_expert` int32 [tiles] each tile's."""

    sizes: jax.Array
    expert: jax.Array
    slot: jax.Array
    tile_expert: jax.Array
    tile: int = flax.struct.field(pytree_node=False)
    native: bool = flax.struct.field(pytree_node=False)  # ragged_dot (GPU/TPU) instead of tiles

    @classmethod
    def sort(cls, assignments: jax.Array, n_expert: int, *, native: bool | None = None
             ) -> tuple["ExpertGroups", jax.Array]:
        """assignments int [m] (expert of each row, unsorted) -> (the groups, order int32 [m]: row j of the
        sorted layout is assignment order[j])."""
        m = assignments.shape[0]
        order = jnp.argsort(assignments, stable=True).astype(jnp.int32)
        expert = assignments[order].astype(jnp.int32)
        sizes = jnp.bincount(assignments, length=n_expert).astype(jnp.int32)
        tile = tile_rows(m, n_expert)
        padded = -(-sizes // tile) * tile  # each group in whole tiles
        padded_end = jnp.cumsum(padded)
        start = jnp.cumsum(sizes) - sizes
        slot = (padded_end - padded)[expert] + jnp.arange(m, dtype=jnp.int32) - start[expert]
        n_tiles = -(-(m + n_expert * (tile - 1)) // tile)  # the most tiles any assignment can need
        # tiles past the last group hold no row: any expert will do (its product is discarded)
        tile_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(n_tiles) * tile, side="right"),
                                  n_expert - 1).astype(jnp.int32)
        if native is None:
            native = jax.default_backend() in ("gpu", "tpu")
        return cls(sizes=sizes, expert=expert, slot=slot, tile_expert=tile_expert, tile=tile, native=native), order

    def matmul(self, x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
        """x [m, in] (sorted rows) times each row's expert kernel of w [E, in, out] -> [m, out] in `out_dtype`
        (products in x's dtype, accumulated in fp32)."""
        w = w.astype(x.dtype)
        if self.native:
            return jax.lax.ragged_dot(x, w, self.sizes, preferred_element_type=jnp.float32).astype(out_dtype)
        m, d = x.shape
        n_tiles = self.tile_expert.shape[0]
        tiles = jnp.zeros((n_tiles * self.tile, d), x.dtype).at[self.slot].set(x).reshape(n_tiles, self.tile, d)

        # checkpointed: the backward pass slices w[e] again instead of keeping a copy per tile (which
        # would hold n_tiles expert kernels: 3.7 GB per Mixtral-8x7B matrix and layer at 512 tokens)
        @jax.checkpoint
        def one_tile(_, inputs):
            rows, e = inputs
            product = jnp.dot(rows, jax.lax.dynamic_index_in_dim(w, e, keepdims=False),
                              preferred_element_type=jnp.float32)
            return None, product.astype(out_dtype)

        _, out = jax.lax.scan(one_tile, None, (tiles, self.tile_expert))
        return out.reshape(n_tiles * self.tile, -1)[self.slot]

    def per_row(self, values: jax.Array) -> jax.Array:
        """values [E, ...] (a per-expert bias, DoRA ratio, ...) -> [m, ...], each row its expert's."""
        return values[self.expert]


MOE_DISPATCH = ("auto", "dense", "sparse")  # how an MoE layer runs its experts (models.gpt.MLP)
# CPU rule constants, from benchmarks/moe_dispatch.py (RESULTS.md): below MIN_SPARSE_ROWS assignments the sort,
# the scatter and the tile loop cost more than dense dispatch saves; above it a sparse row (padding included)
# costs about SPARSE_ROW_COST dense (token, expert) products.
MIN_SPARSE_ROWS = 64
SPARSE_ROW_COST = 2.0


def sparse_pays(tokens: int, n_expert: int, top_k: int) -> bool:
    """The "auto" dispatch rule for a layer call on `tokens` tokens (static shapes: decided while tracing).

    GPU / TPU (native grouped GEMM): sparse whenever it skips work (n_expert > top_k); not measured here.
    CPU: sparse when there are at least MIN_SPARSE_ROWS assignments and their rows plus the expected tile
    padding cost less than dense dispatch's tokens * n_expert products:
    (tokens * top_k + n_expert * (tile - 1) / 2) * SPARSE_ROW_COST < tokens * n_expert.
    """
    if n_expert <= top_k:
        return False
    if jax.default_backend() in ("gpu", "tpu"):
        return True
    rows = tokens * top_k
    padding = n_expert * (tile_rows(rows, n_expert) - 1) / 2
    return rows >= MIN_SPARSE_ROWS and (rows + padding) * SPARSE_ROW_COST < tokens * n_expert


def router_statistics(top_idx: jax.Array, probs: jax.Array, token_weights: jax.Array) -> jax.Array:
    """One layer's routing over the weighted tokens, fp32 [2, E]: row 0 the top-k assignments per expert,
    row 1 the summed router probabilities per expert. top_idx int [b, t, k], probs fp32 [b, t, E],
    token_weights fp32 [b, t] (0 for padding)."""
    n_expert, k = probs.shape[-1], top_idx.shape[-1]
    w = token_weights.reshape(-1)
    counts = jnp.zeros(n_expert, jnp.float32).at[top_idx.reshape(-1)].add(jnp.repeat(w, k))
    return jnp.stack([counts, jnp.einsum("bte,bt->e", probs, token_weights)])


def load_balancing_loss(stats: jax.Array, tokens: jax.Array) -> jax.Array:
    """The Switch Transformer auxiliary loss as transformers' `load_balancing_loss_func` computes it over all
    layers at once: E * sum_e f_e * P_e, with f_e the top-k assignments to expert e and P_e its summed router
    probability, each divided by the rows (layers x real tokens). stats fp32 [layers, 2, E]; tokens: real
    tokens of the batch."""
    rows = jnp.maximum(stats.shape[0] * tokens, 1.0)
    counts, probs = jnp.sum(stats, axis=0) / rows
    return stats.shape[-1] * jnp.sum(counts * probs)
