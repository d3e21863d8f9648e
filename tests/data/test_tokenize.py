"""Length policy and report (docs/correctness.md rule 7), text format, pad vs EOS (rule 5)."""

import pytest
from helpers import conv, decode, encoder, supervised_runs

from sftlab.config import DataConfig
from sftlab.data.formats import Conversation
from sftlab.data.tokenize import DatasetReport, encode_dataset
from sftlab.errors import DataError

SHORT = conv(("user", "hi"), ("assistant", "hello"))
LONG_REPLY = conv(("user", "hi"), ("assistant", "word " * 60))
LONG_PROMPT = conv(("user", "word " * 60), ("assistant", "ok"))


def run(tok, convs, **data):
    report = DatasetReport(name="t")
    kept = encode_dataset(encoder(tok), convs, DataConfig(**data), report)
    return kept, report


def test_truncate_keeps_the_head_and_counts_lost_supervision(smol_tok):
    [full] = encoder(smol_tok).encode(LONG_REPLY)
    kept, report = run(smol_tok, [SHORT, LONG_REPLY], max_length=30, overflow="truncate")
    assert [len(k.input_ids) for k in kept][1] == 30
    assert kept[1].input_ids == full.input_ids[:30]
    assert (report.kept, report.truncated, sum(report.dropped.values())) == (2, 1, 0)
    assert report.supervised_lost == full.supervised - kept[1].supervised > 0
    assert report.supervised_kept == kept[0].supervised + kept[1].supervised
    assert report.tokens == len(kept[0].input_ids) + 30


def test_truncation_that_leaves_only_prompt_drops_and_counts(smol_tok):
    kept, report = run(smol_tok, [SHORT, LONG_PROMPT], max_length=30, overflow="truncate")
    assert len(kept) == 1
    assert report.dropped == {"prompt fills max_length (no supervised token left)": 1}
    assert report.supervised_lost == encoder(smol_tok).encode(LONG_PROMPT)[0].supervised


def test_drop_policy(smol_tok):
    kept, report = run(smol_tok, [SHORT, LONG_REPLY], max_length=30, overflow="drop")
    assert len(kept) == 1 and report.truncated == 0
    assert report.dropped == {"longer than max_length (overflow: drop)": 1}


def test_error_policy_names_the_record_and_the_fix(smol_tok):
    with pytest.raises(DataError, match=r"test:1: example has \d+ tokens, more than data.max_length=30.*overflow"):
        run(smol_tok, [LONG_REPLY], max_length=30, overflow="error")


def test_report_lengths_and_round_trip(smol_tok):
    _, report = run(smol_tok, [SHORT, LONG_REPLY], max_length=30)
    assert report.length["max"] == 30
    assert DatasetReport.from_dict(report.to_dict()) == report


def test_text_format_trains_every_token_and_ends_with_eos(smol_tok):
    [enc] = encoder(smol_tok).encode(Conversation(text="Plain text.", origin="t"))
    assert enc.labels == enc.input_ids and enc.input_ids[-1] == smol_tok.eos_token_id


def test_pad_is_never_eos(smol_tok):
    assert smol_tok.pad_token_id is not None and smol_tok.pad_token_id != smol_tok.eos_token_id


def test_missing_end_of_turn_is_reported(smol_tok):
    from sftlab.data.templates import ChatTemplate, end_of_turn_ids
    from sftlab.data.tokenize import Encoder

    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}" \
            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    enc = Encoder(smol_tok, ChatTemplate(smol_tok, plain), "assistant", end_of_turn_ids(smol_tok))
    report = DatasetReport(name="t")
    kept = encode_dataset(enc, [SHORT], DataConfig(), report)
    (run,) = supervised_runs(kept[0].input_ids, kept[0].labels)
    assert decode(smol_tok, run[1]) == "hello\n"  # with no end-of-turn token, the whole reply piece trains
    assert "will not learn to stop" in report.warnings[0]
