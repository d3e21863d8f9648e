"""Data order and batches: seeded epochs, steps independent of their split, length grouping, padded, packed and padding-free rows."""

import torch

from sftlab.data.batching import collate, collate_packed, epoch_steps, plan_epoch, supervised_count

LENGTHS = [(i * 37) % 101 + 3 for i in range(203)]


def flat(steps):
    return [i for step in steps for mb in step for i in mb]


def test_every_example_once_per_epoch_in_a_seeded_order():
    steps = plan_epoch(LENGTHS, 4, 2, seed=1, epoch=0)
    assert sorted(flat(steps)) == list(range(len(LENGTHS)))
    assert steps == plan_epoch(LENGTHS, 4, 2, seed=1, epoch=0)
    assert flat(steps) != flat(plan_epoch(LENGTHS, 4, 2, seed=1, epoch=1))
    assert flat(steps) != flat(plan_epoch(LENGTHS, 4, 2, seed=2, epoch=0))


def test_a_step_holds_the_same_examples_however_it_is_split():
    a = plan_epoch(LENGTHS, 8, 1, seed=3, epoch=0)
    b = plan_epoch(LENGTHS, 1, 8, seed=3, epoch=0)
    c = plan_epoch(LENGTHS, 2, 2, seed=3, epoch=0, world_size=2, rank=0)
    d = plan_epoch(LENGTHS, 2, 2, seed=3, epoch=0, world_size=2, rank=1)
    assert [sorted(flat([s])) for s in a] == [sorted(flat([s])) for s in b]
    assert [sorted(flat([x]) + flat([y])) for x, y in zip(c, d)] == [sorted(flat([s])) for s in a]
    assert all(len(mb) == 1 for step in b for mb in step) and all(len(step) <= 8 for step in b)


def test_grouping_by_length_cuts_padding():
    def padding(steps):
        return sum(len(mb) * max(LENGTHS[i] for i in mb) - sum(LENGTHS[i] for i in mb) for s in steps for mb in s)

    grouped = plan_epoch(LENGTHS, 8, 1, seed=0, epoch=0, group_by_length=True)
    plain = plan_epoch(LENGTHS, 8, 1, seed=0, epoch=0, group_by_length=False)
    assert padding(grouped) < padding(plain) / 5
    steps = epoch_steps(LENGTHS, 8, 0, 0, True)
    assert sorted(i for s in steps for i in s) == list(range(len(LENGTHS)))
    assert sum(len(s) < 8 for s in steps) == 1  # one short step, wherever it lands


def test_collate_pads_right_and_never_labels_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert supervised_count(b) == 2  # a row's first label predicts nothing after the shift
    assert b["input_ids"].dtype == torch.long

ROWS = [{"input_ids": [1, 5, 9, 13, 2, 7, 8], "labels": [-100, -100, 9, 13, 2, -100, 8]},
        {"input_ids": [1, 4, 2], "labels": [-100, 4, 2]},
        {"input_ids": [3, 3, 3, 3], "labels": [3, 3, 3, 3]},
        {"input_ids": [6, 1, 5], "labels": [-100, 1, 5]}]


def test_packed_layout():
    b = collate_packed(ROWS, max_length=8, pad_id=0)
    assert b["input_ids"].shape[1] <= 8  # best-fit-decreasing bins never exceed max_length
    segments = b["cu_seq_lens_q"].diff().tolist()
    assert sum(segments) == b["input_ids"].numel()
    real = sorted(segments)
    for n in (7, 4, 3, 3):
        real.remove(n)  # every example is one segment; what remains are the bins' padded tails
    assert sum(real) == b["input_ids"].numel() - 17
    for row_pos, row_labels in zip(b["position_ids"].tolist(), b["labels"].tolist()):
        for i, p in enumerate(row_pos):
            if p == 0:
                assert row_labels[i] == -100  # no example learns to predict the next one's first token
    assert (b["labels"][:, 1:] != -100).sum() == (collate(ROWS, 0)["labels"][:, 1:] != -100).sum()


def test_padding_free_layout_is_one_row_of_the_real_tokens():
    b = collate_packed(ROWS, max_length=None, pad_id=0)
    assert b["input_ids"].shape == (1, 17)  # padded: 4 rows x 7
    assert b["cu_seq_lens_q"].diff().tolist() == [7, 4, 3, 3]
    assert (b["labels"][:, 1:] != -100).sum() == (collate(ROWS, 0)["labels"][:, 1:] != -100).sum()
