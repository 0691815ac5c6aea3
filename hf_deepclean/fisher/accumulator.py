"""Running sums of squared per-sample gradients, one buffer per parameter in scope (or, for parameters sharded by
FSDP2, one block of it per process)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..sharding import local_tensor, row_block


class FisherAccumulator:
    """Float32 sums of squared per-sample gradients, keyed by parameter name.

    A parameter with one use per pass takes squared contributions directly. A parameter with several uses
    (tied, shared) collects its per-sample gradients in a `[N, *shape]` stash, squared and summed by `flush()`.

    Tied input/output embeddings (one `nn.Embedding` call and one `nn.Linear` call on the same `[V, d]` weight)
    avoid the stash: a sample's gradient is `D_n + S_n` with `D_n` dense (output layer) and `S_n` non-zero only on
    the rows of the sample's tokens, so `sum_n (D_n + S_n)² = sum_n D_n² + sum_n (2 D_n S_n + S_n²)` where the
    second sum only involves those rows. `D_n²` is added as for any layer; the rows of `D_n` at the sample's
    tokens are kept (`tied_dense`), and the cross terms are added when the embedding's rows `S_n` arrive.
    """

    def __init__(self, params: Mapping[str, nn.Parameter]):
        self.sums = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
        self.shared: set[str] = set()
        self.stash: dict[str, torch.Tensor] = {}
        self.sparse_tied: set[str] = set()
        self.tied_keys: dict[str, torch.Tensor] = {}  # sorted `sample * V + row` of each sample's tokens
        self.tied_dense: dict[str, torch.Tensor] = {}
        self.tied_sparse: dict[str, torch.Tensor] = {}
        # parameters whose per-sample gradients come from the engine's exact path in the current pass: whatever
        # a rule computes for them is dropped, the exact path adds their squares (`add_exact`)
        self.exact: set[str] = set()
        self.batch_size = 0
        # valid length of each sample of the current pass (trailing padding cut), and the padded length
        self.lengths: torch.Tensor | None = None
        self.padded_length = 0

    def results(self) -> dict[str, torch.Tensor]:
        """The float32 sums, keyed by parameter name, in the layout of the parameters."""
        return self.sums

    def commit(self) -> None:
        """Called by the engine once a module call's rule has run and after each backward pass (see
        `ShardedFisherAccumulator`); nothing to do when the sums are whole."""

    def add_squares(self, name: str, squares: torch.Tensor) -> None:
        """Add `sum_n (per-sample gradient)²`, computed by a rule that never materialised the gradients."""
        if name in self.exact:
            return
        self.sums[name].add_(squares)

    def add_per_sample(self, name: str, grads: torch.Tensor, samples: int | torch.Tensor = 0) -> None:
        """Add per-sample gradients `[c, *shape]` of samples `samples .. samples + c` (or of the listed samples)."""
        if name in self.exact:
            return
        if name in self.sparse_tied:
            self._keep_token_rows(name, grads, samples)
        if name not in self.shared or name in self.sparse_tied:
            self.sums[name].add_(grads.square_().sum(0) if grads.is_contiguous() else grads.square().sum(0))
            return
        if name not in self.stash:
            self.stash[name] = grads.new_zeros((self.batch_size, *self.sums[name].shape))
        if isinstance(samples, torch.Tensor):
            self.stash[name].index_add_(0, samples, grads)
        else:
            self.stash[name][samples : samples + grads.shape[0]].add_(grads)

    def _keep_token_rows(self, name: str, grads: torch.Tensor, samples: int | torch.Tensor) -> None:
        keys = self.tied_keys[name]
        num_rows = self.sums[name].shape[0]
        key_samples, key_rows = keys // num_rows, keys % num_rows
        position = torch.full((self.batch_size,), -1, dtype=torch.long, device=keys.device)
        if isinstance(samples, torch.Tensor):
            position[samples] = torch.arange(len(samples), device=keys.device)
        else:
            position[samples : samples + grads.shape[0]] = torch.arange(grads.shape[0], device=keys.device)
        position = position[key_samples]
        hit = position >= 0
        if name not in self.tied_dense:
            self.tied_dense[name] = grads.new_zeros((len(keys), *grads.shape[2:]))
        self.tied_dense[name][hit] += grads[position[hit], key_rows[hit]]

    def add_rows(self, name: str, rows: torch.Tensor, index: torch.Tensor, sample: torch.Tensor) -> None:
        """Add row-sparse per-sample gradients: `rows[k]` goes to row `index[k]` of sample `sample[k]`.

        Rows are summed per (sample, row) before squaring.
        """
        if name in self.exact:
            return
        num_rows = self.sums[name].shape[0]
        keys = sample * num_rows + index
        if name in self.sparse_tied:
            tied_keys = self.tied_keys[name]
            per_key = rows.new_zeros((len(tied_keys), *rows.shape[1:]))
            per_key.index_add_(0, torch.searchsorted(tied_keys, keys), rows)
            if name in self.tied_sparse:
                per_key += self.tied_sparse[name]
            self.tied_sparse[name] = per_key
            return
        if name in self.shared:
            if name not in self.stash:
                self.stash[name] = rows.new_zeros((self.batch_size, *self.sums[name].shape))
            self.stash[name].view(-1, *rows.shape[1:]).index_add_(0, keys, rows)
            return
        unique, inverse = torch.unique(keys, return_inverse=True)
        per_sample_rows = rows.new_zeros((len(unique), *rows.shape[1:])).index_add_(0, inverse, rows)
        self.sums[name].index_add_(0, unique % num_rows, per_sample_rows.square())

    def add_exact(self, name: str, grad: torch.Tensor) -> None:
        """Add the square of one sample's whole gradient of `name`, from the engine's exact per-sample path."""
        self.sums[name].add_(grad.float().square())

    def flush(self) -> None:
        """Square and add the stashed per-sample gradients (after each backward pass)."""
        for name, grads in self.stash.items():
            self.sums[name].add_(grads.square().sum(0))
        self.stash.clear()
        for name, sparse in self.tied_sparse.items():
            dense = self.tied_dense.get(name)
            cross = sparse.square() if dense is None else sparse * (2 * dense + sparse)
            self.sums[name].index_add_(0, self.tied_keys[name] % self.sums[name].shape[0], cross)
        self.tied_sparse.clear()
        self.tied_dense.clear()


class _FullSizeBuffers(dict):
    """`{name: float32 zeros of the parameter's whole shape}`, made on first use."""

    def __init__(self, shapes: Mapping[str, torch.Size], device: torch.device):
        super().__init__()
        self.shapes, self.device = shapes, device

    def __missing__(self, name: str) -> torch.Tensor:
        self[name] = torch.zeros(self.shapes[name], dtype=torch.float32, device=self.device)
        return self[name]


class ShardedFisherAccumulator(FisherAccumulator):
    """Fisher sums of parameters sharded by FSDP2: each process keeps only its block of rows of each sum.

    The rules write whole-shape contributions, as for unsharded parameters, into buffers that exist only while one
    module call's rule runs (or, for shared parameters, until the backward pass ends); `commit` adds this process's
    rows of them to its block and frees them. Peak memory is the blocks plus one module's whole-shape sums.

    Every process runs every row (the engine then needs no collective of its own, so FSDP's gathers stay in step
    whatever the data), so each block equals the same rows of the sums one process would compute, bit for bit.
    """

    def __init__(self, params: Mapping[str, nn.Parameter]):
        super().__init__({})
        first = next(iter(params.values()))
        self.blocks = {name: row_block(p, name) for name, p in params.items()}
        self.sums = _FullSizeBuffers({name: p.shape for name, p in params.items()}, local_tensor(first).device)
        self.local = {
            name: torch.zeros(local_tensor(p).shape, dtype=torch.float32, device=local_tensor(p).device)
            for name, p in params.items()
        }

    def results(self) -> dict[str, torch.Tensor]:
        return self.local

    def commit(self) -> None:
        for name, whole in self.sums.items():
            start, stop = self.blocks[name]
            self.local[name].add_(whole[start:stop])
        self.sums.clear()

    def flush(self) -> None:
        super().flush()
        self.commit()
