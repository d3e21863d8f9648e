"""The tokenizing pipeline: parallel workers give what one process gives, the reader is never far ahead of the
writer (memory bounded by chunks), the batched tokenizer gives the tokenizer's own ids, and a record's id,
metadata and loss_weight reach the tokenized dataset."""

import gc
import itertools
import json
import random

import pytest
from conftest import write_jsonl

import sftlab.data.dataset as dataset
import sftlab.data.pipeline as pipeline
from sftlab.config import DataConfig, DatasetSpec
from sftlab.data.conversation import Message
from sftlab.data.formats import Conversion
from sftlab.data.templates import ChatTemplate
from sftlab.data.tokenize import Encoder
from sftlab.errors import DataError

WORDS = "river stone garden light music cloud water number answer city tree".split()


def chats(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": say(4)}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": say(rng.randint(2, 12))},
                         {"role": "assistant", "content": say(rng.randint(2, 30))}]  # fmt: skip
        out.append({"id": f"r{i}", "metadata": {"category": "ab"[i % 2], "n": i}, "messages": messages})
    return out


def load(path, tok, **kw):
    return dataset.load_split(DataConfig(train=[DatasetSpec(path=str(path))], cache=False, **kw), tok)


def test_workers_give_what_one_process_gives(smol_tok, tmp_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "CHUNK", 16)  # 300 chats: 19 chunks, so the pool runs
    rows = chats(300)
    rows[7]["messages"][-1]["content"] = "x " * 300  # truncated
    rows[11] = {"messages": [{"role": "user", "content": "only a question"}]}  # a bad record, skipped
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    one = load(path, smol_tok, num_proc=1, max_length=256, on_bad_record="skip")
    two = load(path, smol_tok, num_proc=2, max_length=256, on_bad_record="skip")
    assert gc.get_freeze_count() == 0  # the heap frozen while the data streamed is handed back to the collector
    gc.freeze()  # a caller's own frozen heap stays frozen
    try:
        assert load(path, smol_tok, num_proc=1, max_length=256, on_bad_record="skip").dataset.to_dict() == \
            one.dataset.to_dict() and gc.get_freeze_count()
    finally:
        gc.unfreeze()
    assert one.dataset.to_dict() == two.dataset.to_dict()
    assert one.reports[0].to_dict() == two.reports[0].to_dict()
    report = two.reports[0]
    assert (report.read, report.kept, report.truncated) == (300, 299, 1)
    assert report.dropped == {"bad record: no assistant turn": 1}


def test_a_bad_record_in_a_worker_is_reported_with_its_line(smol_tok, tmp_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "CHUNK", 8)
    moves = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant: ' if messages | length < 3 else 'model: ' }}{% endif %}")
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 40
    rows = rows + [{"messages": rows[0]["messages"] * 2}]  # renders differently from its own prefix
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d.jsonl:41: template 'custom' renders assistant message 3"):
        load(path, smol_tok, num_proc=2, template=moves)
    assert gc.get_freeze_count() == 0  # handed back to the collector on the error's way out too


def test_workers_parse_the_lines_and_name_the_first_bad_record_of_the_file(smol_tok, tmp_cache, tmp_path,
                                                                            monkeypatch):  # fmt: skip
    # The reader hands JSONL lines on unparsed; a worker parses and converts them, and under
    # on_bad_record=error the earliest bad record is named, whether the JSON, the conversion or the template fails.
    monkeypatch.setattr(pipeline, "CHUNK", 8)
    from sftlab.data import sources
    from sftlab.data.formats import LoadResult

    rows = [json.dumps(r) for r in chats(60)]
    spec = DatasetSpec(path=str(tmp_path / "d.jsonl"))
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    conversion, records = sources.spec_records(spec, LoadResult())
    assert {type(raw) for _, raw, _ in records} == {bytes}
    lone = json.dumps({"messages": [{"role": "user", "content": "only a question"}]})
    moves = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant: ' if messages | length < 3 else 'model: ' }}{% endif %}")
    two_turns = next(r for r in rows if len(json.loads(r)["messages"]) == 4)  # moves renders it unlike its prefix
    one_turn = [json.dumps(r) for r in chats(300) if len(r["messages"]) < 4][:50]
    for bad, line, expect in ((("{oops",), 21, "d.jsonl:21: malformed JSON"),
                              ((lone,), 33, "d.jsonl:33: the conversation has no assistant turn"),
                              ((two_turns, "{oops"), 44, "d.jsonl:44: template 'custom' renders"),
                              (("{oops", two_turns), 44, "d.jsonl:44: malformed JSON")):  # fmt: skip
        lines = list(one_turn)
        lines[line - 1 : line - 1] = bad
        (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=expect):
            load(tmp_path / "d.jsonl", smol_tok, num_proc=2, template=moves)
    (tmp_path / "d.jsonl").write_text("\n".join(rows[:30] + ["{oops", lone, "[1]"] + rows[30:]) + "\n")
    one, two = (load(tmp_path / "d.jsonl", smol_tok, num_proc=n, on_bad_record="skip") for n in (1, 2))
    assert one.dataset.to_dict() == two.dataset.to_dict() and len(one.dataset) == 60
    assert one.reports[0].to_dict() == two.reports[0].to_dict()
    assert two.reports[0].read == 63 and two.reports[0].dropped == {
        "bad record: malformed JSON": 1, "bad record: no assistant turn": 1, "bad record: not an object": 1}


@pytest.mark.parametrize("procs", [1, 2])
def test_bad_rows_read_in_the_parent_reach_the_workers_and_a_later_files_fault_waits_its_turn(
        smol_tok, tmp_cache, tmp_path, monkeypatch, procs):  # fmt: skip
    # A CSV reader hands a bad row on as a RecordProblem, which must survive the trip to a worker (a task that
    # cannot be unpickled kills its worker and the pool waits forever). A fault found while reading a later
    # file (a malformed .json array) raises only after the chunks before it: their bad record is named first.
    import csv

    monkeypatch.setattr(pipeline, "CHUNK", 8)
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "a.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "completion"])
        for i in range(40):
            writer.writerow([f"question {i}", f"answer {i}"] + (["extra"] if i == 25 else []))
    one = load(data / "a.csv", smol_tok, num_proc=procs, on_bad_record="skip")
    assert len(one.dataset) == 39 and one.reports[0].dropped == {"bad record: extra fields": 1}
    with pytest.raises(DataError, match=r"a.csv:27: "):
        load(data / "a.csv", smol_tok, num_proc=procs)
    (data / "b.json").write_text('[{"prompt": "q", "completion": "a"},\n  oops]')
    with pytest.raises(DataError, match=r"a.csv:27: "):
        load(data, smol_tok, num_proc=procs)
    (data / "a.csv").write_text("prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(40)))
    with pytest.raises(DataError, match=r"b.json:2: malformed JSON"):
        load(data, smol_tok, num_proc=procs)


def test_a_worker_that_dies_fails_the_run_instead_of_leaving_it_waiting(smol_tok, tmp_cache, tmp_path, monkeypatch):
    # multiprocessing's Pool replaces a killed worker (the out-of-memory killer's SIGKILL) and waits for its
    # chunk forever; the pipeline's pool breaks instead, and the run fails saying what happened.
    import os
    import signal

    def stuck(*_):
        raise TimeoutError("the pipeline still waits for the dead worker's chunk")

    monkeypatch.setattr(pipeline, "CHUNK", 8)
    real = pipeline._conversations

    def dying(chunk, *args):  # runs in a worker: the parent hands every chunk on
        if any(origin.endswith(":30") for origin, _, _ in chunk):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(chunk, *args)

    monkeypatch.setattr(pipeline, "_conversations", dying)
    path = write_jsonl(tmp_path / "d.jsonl", chats(80))
    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(120)
    try:
        died = (r"worker process died \(killed by a signal: the out-of-memory killer sends SIGKILL\) with chunks of 8 "
                r"records in flight; free memory or lower data.num_proc \(now 2\)")
        with pytest.raises(DataError, match=died):
            load(path, smol_tok, num_proc=2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    monkeypatch.setattr(pipeline, "_conversations", real)
    assert len(load(path, smol_tok, num_proc=2).dataset) == 80  # a fresh pool for the next run


def test_the_reader_stays_a_few_chunks_ahead_of_the_writer(smol_tok, monkeypatch):
    monkeypatch.setattr(pipeline, "CHUNK", 4)
    pulled = []

    def stream():
        for i, row in enumerate(chats(200)):
            pulled.append(i)
            yield f"gen:{i}", json.dumps(row).encode(), "messages"  # a JSONL line, as the reader hands it on

    encoder = Encoder(smol_tok, ChatTemplate(smol_tok), "assistant", {smol_tok.eos_token_id})
    job = (encoder, DataConfig(), 1.0, Conversion())
    ahead = [len(pulled) for _ in pipeline._results(pipeline._chunks(stream()), job, procs=2)]
    assert len(pulled) == 200 and len(ahead) == 50
    assert ahead[0] <= (pipeline.IN_FLIGHT * 2 + 1) * 4  # not the whole stream before the first result


def test_batched_tokenizing_falls_back_where_the_backend_disagrees(smol_tok):
    class Lowering:  # a wrapper that changes the text before its backend sees it
        backend_tokenizer = smol_tok.backend_tokenizer

        def __call__(self, text, **kw):
            return smol_tok([t.lower() for t in text] if isinstance(text, list) else text.lower(), **kw)

    encoder = Encoder(smol_tok, ChatTemplate(smol_tok), "assistant", set())
    texts = ["Hello World", "<|im_start|>user\nHi THERE<|im_end|>\n", " spaces  and\ttabs"]
    assert encoder.ids(texts) == [smol_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert encoder.backend  # SmolLM2's fast tokenizer: the backend agrees
    wrapped = Encoder(Lowering(), ChatTemplate(smol_tok), "assistant", set())
    assert wrapped.ids(texts) == [smol_tok(t.lower(), add_special_tokens=False)["input_ids"] for t in texts]
    assert wrapped.backend is False


def test_every_worker_chooses_the_batch_encoder_alike_whatever_it_reads_first(smol_tok):
    # A wrapper that changes some texts only: a probe of each worker's first texts would choose per worker, and the
    # dataset would depend on which worker encoded which chunk. The probe is fixed: one choice, the same ids.
    class Shouting:
        backend_tokenizer = smol_tok.backend_tokenizer

        def __call__(self, text, **kw):
            return smol_tok([t.upper() if "zz" in t else t for t in text], **kw)

    texts = ["buzz off"] + [f"a plain line {i}" for i in range(20)]  # "buzz" in one worker's first texts only
    first, second = (Encoder(Shouting(), ChatTemplate(smol_tok), "assistant", set()) for _ in range(2))
    assert first.ids(texts) == second.ids(texts[::-1])[::-1]
    assert first.backend and second.backend


def test_joined_pieces_give_each_pieces_own_ids_and_fall_back_where_they_would_not(smol_tok):
    # An example's pieces go to the tokenizer as one sequence joined by a private added token and are cut there:
    # the ids of each piece alone. A piece holding the mark's text goes alone; a tokenizer whose pre-tokenizer
    # treats a sequence's first split apart (Metaspace, prepend_scheme "first") is refused by the probe.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sftlab.data.tokenize import _agreeing_joiner, _Joined, _joiner_for

    examples = [["<|im_start|>user\nHi THERE<|im_end|>\n<|im_start|>assistant\n", "Fine.<|im_end|>\n"],
                ["\n", " lead", "trail ", "\t"], ["one piece"], [f"a{_Joined.MARK}b", "c"], ["", "x", ""]]
    own = [smol_tok(t, add_special_tokens=False)["input_ids"] for ex in examples for t in ex]
    encoder = Encoder(smol_tok, ChatTemplate(smol_tok), "assistant", set())
    assert encoder.piece_ids(examples) == own and encoder.joined  # SmolLM2's tokenizer: joined
    try:  # a change the backend's copy would not see: probed again, and refused
        smol_tok.split_special_tokens = True
        assert _joiner_for(smol_tok) is False
    finally:
        smol_tok.split_special_tokens = False
    assert _joiner_for(smol_tok)
    vocab = {w: i for i, w in enumerate(["[UNK]", "\u2581end", "end", "\u2581Hello", "Hello", "\u2581world", "world"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    first = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    assert _agreeing_joiner(first) is False
    pieces = [["Hello world", "end"], ["end", "Hello"]]
    encoder = Encoder(first, ChatTemplate(smol_tok), "assistant", set())
    assert encoder.piece_ids(pieces) == [first(t, add_special_tokens=False)["input_ids"] for ex in pieces for t in ex]
    assert encoder.piece_ids(pieces)[1] == [vocab["\u2581end"]]  # alone, the piece is its sequence's first split


def test_render_is_apply_chat_template(smol_tok):
    from sftlab.data.chat_templates import BUILTIN
    from sftlab.data.templates import TEMPLATE_ERRORS, template_message

    weather = {"type": "function", "function": {"name": "weather", "description": "d",
                                                "parameters": {"type": "object", "properties": {}}}}  # fmt: skip
    msgs = (Message("system", "be brief"), Message("user", "hi"), Message("assistant", "yo", reasoning="think"),
            Message("user", "weather?"))  # fmt: skip
    compared = 0
    for name in BUILTIN:
        t = ChatTemplate(smol_tok, name)
        for gen, tools in itertools.product((False, True), ((), (weather,))):
            dicts = [template_message(m, t.reasoning_field) for m in msgs]
            try:
                own = smol_tok.apply_chat_template(dicts, tools=list(tools) or None, chat_template=t.source,
                                                   tokenize=False, add_generation_prompt=gen)  # fmt: skip
            except TEMPLATE_ERRORS as e:  # a template that refuses a system turn refuses it both ways
                with pytest.raises(type(e)):
                    t.render(msgs, gen, tools)
                continue
            assert t.render(msgs, gen, tools) == own, name
            compared += 1
    assert compared >= 2 * len(BUILTIN)


def test_id_metadata_and_loss_weight_reach_the_tokenized_dataset(smol_tok, tmp_cache, tmp_path):
    rows = chats(4)
    rows[1]["loss_weight"] = 2.5
    del rows[2]["id"], rows[2]["metadata"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    spec = DatasetSpec(path=str(path), loss_weight=2.0)
    data = dataset.load_split(DataConfig(train=[spec]), smol_tok).dataset
    by_id = {r["id"]: r for r in data}
    assert set(by_id) == {"r0", "r1", None, "r3"}
    assert json.loads(by_id["r3"]["metadata"]) == {"category": "b", "n": 3}
    assert by_id[None]["metadata"] is None
    assert [by_id[k]["loss_weight"] for k in ("r0", "r1", None)] == [2.0, 5.0, 2.0]


@pytest.mark.parametrize("field, value, message", [
    ("loss_weight", -1, "field 'loss_weight' must be a number above 0, got -1"),
    ("loss_weight", "heavy", "field 'loss_weight' must be a number above 0, got 'heavy'"),
    ("metadata", ["a"], "field 'metadata' must be a JSON object"),
    ("id", 1.5, "field 'id' must be text or an integer, got float 1.5"),
])  # fmt: skip
def test_a_bad_id_metadata_or_loss_weight_is_refused_at_its_line(smol_tok, tmp_cache, tmp_path, field, value, message):
    rows = chats(3)
    rows[1][field] = value
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=rf"d.jsonl:2: {message}"):
        load(path, smol_tok)


def test_parquet_is_read_batch_by_batch_in_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sftlab.data.formats import load_conversations

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10_000)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=3000)
    loaded = load_conversations(str(tmp_path / "d.parquet"))
    assert [c.messages[0].content for c in loaded.conversations] == [f"q{i}" for i in range(10_000)]
    assert loaded.conversations[-1].origin.endswith("d.parquet: row 10000")
