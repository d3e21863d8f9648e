import torch

from sftlab.data.batching import collate, epoch_steps, plan_epoch, supervised_count

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
