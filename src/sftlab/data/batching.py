"""Data order and batches: which examples form each optimizer step, and how a micro-batch is padded.

The order is a pure function of (seed, epoch), so a resumed run replays it exactly from any
step. Length grouping works on whole optimizer steps, never inside them: the examples that
make up a step do not depend on how it is split into micro-batches or ranks, which is what makes
batch 8 x accumulation 1 and batch 1 x accumulation 8 the same run.
"""

from __future__ import annotations

import torch

from sftlab.data.tokenize import IGNORE

MEGABATCH_STEPS = 50  # steps sorted together when grouping by length (as HF's LengthGroupedSampler)


def epoch_steps(lengths: list[int], step_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """One epoch as a list of steps (example indices); only the epoch's last step may be short."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if not group_by_length:
        return [order[j : j + step_size] for j in range(0, len(order), step_size)]
    mega = step_size * MEGABATCH_STEPS
    steps = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        sorted_steps = [chunk[j : j + step_size] for j in range(0, len(chunk), step_size)]
        # Shuffle a megabatch's steps so lengths do not fall monotonically through the epoch.
        steps += [sorted_steps[p] for p in torch.randperm(len(sorted_steps), generator=g).tolist()]
    return steps


def plan_epoch(
    lengths: list[int], batch_size: int, grad_accum: int, seed: int, epoch: int,
    group_by_length: bool = True, world_size: int = 1, rank: int = 0,
) -> list[list[list[int]]]:  # fmt: skip
    """This rank's optimizer steps for one epoch: steps -> micro-batches -> example indices.

    A step holds batch_size * grad_accum * world_size examples (one step may hold fewer);
    each rank takes a contiguous share, cut into micro-batches of batch_size.
    """
    plan = []
    for step in epoch_steps(lengths, batch_size * grad_accum * world_size, seed, epoch, group_by_length):
        share = -(-len(step) // world_size)
        mine = step[rank * share : (rank + 1) * share]
        plan.append([mine[j : j + batch_size] for j in range(0, len(mine), batch_size)])
    return plan


def example_lengths(data) -> list[int]:
    """Each example's tokens: the `length` column the data pipeline writes (a few bytes an example, so the
    token columns of a million examples are never read for it), else the lengths of input_ids."""
    if "length" in data.column_names:
        return data["length"]
    return [len(x) for x in data["input_ids"]]


def rows(data, idx: list[int]) -> list[dict]:
    """Examples `idx` of a tokenized dataset (every column), read in one call."""
    cols = data[idx]
    return [dict(zip(cols, values)) for values in zip(*cols.values())]


def pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one padder: right-padded [B, T] ids and the attention mask (1 on real tokens)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padding carries no loss and is masked from attention."""
    ids, mask = pad([r["input_ids"] for r in rows], pad_id)
    labels, _ = pad([r["labels"] for r in rows], IGNORE)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    weights = example_weights(rows)
    if weights is not None:
        batch["loss_weights"] = torch.tensor(weights, dtype=torch.float32)[:, None] * mask
    return batch


def example_weights(rows: list[dict]) -> list[float] | None:
    """Each row's `loss_weight`, or None when all are 1.0 (or absent): such batches carry no weights, so
    unweighted training runs the unweighted code, bit for bit."""
    weights = [float(r.get("loss_weight", 1.0)) for r in rows]
    return weights if any(w != 1.0 for w in weights) else None


def collate_packed(rows: list[dict], max_length: int | None, pad_id: int) -> dict:
    """Best-fit-decreasing pack of the rows into bins of at most max_length tokens (None: one bin for
    all, padding-free), without padding inside a bin. Each example restarts its position ids and is
    its own attention segment; the label of its first token is dropped, so no example learns to
    predict the next one."""
    if max_length is None:
        max_length = sum(len(r["input_ids"]) for r in rows)
    bins: list[list[dict]] = []
    room: list[int] = []
    for r in sorted(rows, key=lambda r: -len(r["input_ids"])):
        n = len(r["input_ids"])
        fits = [i for i, free in enumerate(room) if free >= n]
        if fits:
            best = min(fits, key=lambda i: room[i])
            bins[best].append(r)
            room[best] -= n
        else:
            bins.append([r])
            room.append(max(max_length, n) - n)
    width = max(sum(len(r["input_ids"]) for r in b) for b in bins)
    weighted = example_weights(rows) is not None
    ids, labels, positions, weights, bounds = [], [], [], [], [0]
    for b in bins:
        row_ids, row_labels, row_pos, row_weights = [], [], [], []
        for r in b:
            row_ids += r["input_ids"]
            row_labels += [IGNORE] + list(r["labels"][1:])
            row_pos += range(len(r["input_ids"]))
            row_weights += [float(r.get("loss_weight", 1.0))] * len(r["input_ids"])
            bounds.append(bounds[-1] + len(r["input_ids"]))
        pad = width - len(row_ids)
        if pad:  # the tail of a bin is one more segment that attends only to itself and carries no loss
            row_ids += [pad_id] * pad
            row_labels += [IGNORE] * pad
            row_pos += range(pad)
            row_weights += [0.0] * pad
            bounds.append(bounds[-1] + pad)
        ids.append(row_ids)
        labels.append(row_labels)
        positions.append(row_pos)
        weights.append(row_weights)
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    cu = torch.tensor(bounds, dtype=torch.int32)
    batch = {
        "input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions),
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths),
    }  # fmt: skip
    if weighted:
        batch["loss_weights"] = torch.tensor(weights, dtype=torch.float32)
    return batch


def supervised_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss after the causal shift (a row's first label predicts nothing)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def supervised_weight(batch: dict[str, torch.Tensor]) -> float:
    """The summed loss weights of the tokens that carry loss: the normalizer of a weighted batch
    (docs/correctness.md rule 3); its supervised_count when every weight is 1."""
    keep = batch["labels"][:, 1:] != IGNORE
    return float(batch["loss_weights"][:, 1:][keep].double().sum())


def without_weights(batch: dict) -> dict:
    """The batch as if every example weighed 1 (eval loss, the raw token count)."""
    return {k: v for k, v in batch.items() if k != "loss_weights"}
