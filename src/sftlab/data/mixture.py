"""Which examples of each training dataset make up an epoch: `max_examples`, `epochs` and `weight`.

    n_i   dataset i's examples after the length policy, capped by its max_examples (a seeded sample)
    e_i   its `epochs` (default 1; 3 repeats a small set three times, 0.5 takes a seeded half)
    N     the epoch's size: the sum of round(n_i * e_i)
    w_i   its `weight`: when every dataset of data.train sets one, dataset i gives round(N * w_i / sum w)
          of the N examples instead (N itself stays the sum above)

Examples are drawn without replacement within each pass over a dataset (a dataset asked for more than
it has is repeated whole, then a seeded part), so an epoch holds as many distinct examples as it can.
The draw is a pure function of the seed: the same run draws the same epoch every time, and a resumed
run the same data. It is made once per run; train.epochs repeats the drawn epoch (shuffled anew).
"""

from __future__ import annotations

import torch

from sftlab.errors import ConfigError


def draw(sizes: list[int], specs: list, seed: int) -> list[list[int]]:
    """Per dataset, the indices (into that dataset) of the examples one epoch uses."""
    weights = [s.weight for s in specs]
    if any(w is not None for w in weights) and not all(w is not None for w in weights):
        missing = [s.label for s, w in zip(specs, weights) if w is None]
        raise ConfigError(f"data.train: weights are set on some datasets but not on {', '.join(missing)}; give every "
                          "dataset a weight (its share of each epoch), or none")  # fmt: skip
    pools = [_pool(n, s.max_examples, seed, i) for i, (n, s) in enumerate(zip(sizes, specs))]
    wanted = [round(len(pool) * s.epochs) for pool, s in zip(pools, specs)]
    if weights and weights[0] is not None:
        total, mass = sum(wanted), sum(weights)
        if mass <= 0:
            raise ConfigError("data.train: the weights add up to 0; give at least one dataset a positive weight")
        wanted = [round(total * w / mass) for w in weights]
    return [_take(pool, k, seed, i) for i, (pool, k) in enumerate(zip(pools, wanted))]


def _generator(seed: int, dataset: int, purpose: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + dataset * 101 + purpose)


def _pool(n: int, cap: int | None, seed: int, dataset: int) -> list[int]:
    """The dataset's examples an epoch may use: all of them, or a seeded sample of max_examples."""
    if cap is None or cap >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=_generator(seed, dataset, 0))[:cap].tolist())


def _take(pool: list[int], k: int, seed: int, dataset: int) -> list[int]:
    """k examples of the pool: whole passes over it, then a seeded part of one more."""
    if not pool or k <= 0:
        return []
    whole, rest = divmod(k, len(pool))
    extra = torch.randperm(len(pool), generator=_generator(seed, dataset, 1))[:rest].tolist()
    return pool * whole + sorted(pool[j] for j in extra)
