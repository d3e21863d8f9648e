"""A stream of records -> one tokenized Arrow file, in parallel, in bounded memory.

The records are read lazily (a JSONL file's lines unparsed) and cut into chunks; `data.num_proc` forked
workers turn each chunk into conversations and encode them (parse, convert, render, tokenize in batches,
masks, length policy) while the reader goes on; the results are written to the file in the input's order
as they come back, so the output is the same for any number of processes.
At most a few chunks per worker are in flight: memory is bounded by a chunk, not by the dataset, and the
dataset itself is the memory-mapped file (`datasets.Dataset.from_file`).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import multiprocessing
import os
import signal
from array import array
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from sftlab.config import DataConfig
from sftlab.data.conversation import Conversation, RecordProblem
from sftlab.data.formats import Conversion, Record, bad_record_error
from sftlab.data.tokenize import Chunk, DatasetReport, Encoder, encode_chunk, finish_report
from sftlab.errors import DataError

CHUNK = 512  # records per task: large enough to batch the tokenizer, small enough to keep memory flat
IN_FLIGHT = 3  # chunks per worker queued or being encoded
_JOB: tuple | None = None  # a worker's (encoder, cfg, weight, conversion), set by its pool initializer


def schema():
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    return pa.schema([("input_ids", ids), ("labels", ids), ("loss_weight", pa.float32()), ("id", pa.string()),
                      ("metadata", pa.string()), ("length", pa.int32()), ("supervised", pa.int32())])  # fmt: skip


def worker_count(num_proc: int | None) -> int:
    """data.num_proc, or the cores this process may use shared among the ranks launched on this machine."""
    if num_proc:
        return num_proc
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def tokenize_to_file(records: Iterable[Record], conversion: Conversion, encoder: Encoder, cfg: DataConfig,
                     report: DatasetReport, path: Path, weight: float = 1.0) -> None:  # fmt: skip
    """Encode every record into the Arrow stream file `path` and count them all in `report`; a bad record
    raises or is counted under its kind (data.on_bad_record)."""
    import pyarrow as pa

    lengths = array("l")
    missing_eot = eot_inside = 0
    with _frozen_heap(), pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema()) as writer:
        job = (encoder, cfg, weight, conversion)
        for batch, chunk in _results(_chunks(records), job, worker_count(cfg.num_proc)):
            writer.write_batch(batch)
            lengths.extend(batch.column("length").to_pylist())
            report.absorb(chunk.report)
            missing_eot += chunk.missing_eot
            eot_inside += chunk.eot_inside
    finish_report(report, lengths, encoder.template.name, missing_eot, eot_inside)


@contextlib.contextmanager
def _frozen_heap():
    """The objects alive now (torch, transformers, the tokenizer) kept out of the garbage collector's passes
    while the data streams through: the records and encodings it makes are short-lived, and each full pass
    would walk the whole heap again; forked workers inherit the frozen heap, so their passes do not copy those
    objects' pages from the parent either. Left as it is where the caller froze its own heap."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _chunks(records: Iterable[Record]) -> Iterator[list[Record] | Exception]:
    """The records in chunks; where reading fails (a later file's bad header, a damaged file), the records
    read before it, then the error itself, in its place in the stream: a bad record before it is named first."""
    chunk: list[Record] = []
    try:
        for record in records:
            chunk.append(record)
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
    except Exception as error:  # noqa: BLE001 -- raised by _results after the chunks before it
        if chunk:
            yield chunk
        yield error
        return
    if chunk:
        yield chunk


def _encode(chunk: list[Record], job: tuple | None = None):
    """One task: a chunk's Arrow batch (built in the worker, so the parent only writes it) and its counts."""
    import pyarrow as pa

    encoder, cfg, weight, conversion = job or _JOB
    conversations, skipped = _conversations(chunk, conversion, encoder, cfg, weight)
    done: Chunk = encode_chunk(encoder, conversations, cfg, weight)
    done.report.dropped.update(skipped)
    batch = pa.RecordBatch.from_pydict(done.columns, schema=schema())
    done.columns = {}
    return batch, done


def _conversations(chunk: list[Record], conversion: Conversion, encoder: Encoder, cfg: DataConfig,
                   weight: float) -> tuple[list[Conversation], Counter]:  # fmt: skip
    """The chunk's records as conversations, and the count of bad ones by kind (data.on_bad_record: skip).
    Under `error` the first bad record of the file is the one named: a template problem in the records
    before it raises first."""
    conversations, skipped = [], Counter()
    for origin, raw, fmt in chunk:
        try:
            conversations.append(conversion.conversation(conversion.record(raw), fmt, origin))
        except RecordProblem as e:
            if cfg.on_bad_record == "error":
                encode_chunk(encoder, conversations, cfg, weight)
                raise bad_record_error(origin, e, fmt) from None
            skipped[f"bad record: {e.kind}"] += 1
    return conversations, skipped


def _adopt(job: tuple) -> None:
    """Pool initializer: the worker's job (forked, so the encoder arrives as memory, not as a pickle). Ctrl-C
    reaches the whole process group: the parent stops the pool, so a worker leaves it to the parent."""
    global _JOB
    _JOB = job
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _results(chunks: Iterator[list[Record] | Exception], job: tuple, procs: int) -> Iterator:
    """The chunks' results in order: in this process for a single chunk or num_proc 1, else from a pool. A
    reading error raises once the chunks before it are done (one of them may hold an earlier bad record)."""
    head = list(itertools.islice(chunks, 2))
    chunks = itertools.chain(head, chunks)
    if procs == 1 or len(head) < 2 or multiprocessing.current_process().daemon:  # a daemon may not fork workers
        for chunk in chunks:
            if isinstance(chunk, Exception):
                raise chunk
            yield _encode(chunk, job)
        return
    with _forked_pool(procs, job) as pool:
        pending: deque = deque()
        for chunk in chunks:
            if isinstance(chunk, Exception):
                while pending:
                    yield _result(pending.popleft(), procs)
                raise chunk
            pending.append(pool.submit(_encode, chunk))
            if len(pending) >= IN_FLIGHT * procs:  # the reader waits: memory stays bounded
                yield _result(pending.popleft(), procs)
        while pending:
            yield _result(pending.popleft(), procs)


def _result(future, procs: int):
    """A chunk's result; a worker that died fails the run instead of leaving it waiting for a chunk that will
    never come back."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        return future.result()
    except BrokenProcessPool:
        raise DataError(f"a tokenizing worker process died (killed by a signal: the out-of-memory killer sends "
                        f"SIGKILL) with chunks of {CHUNK} records in flight; free memory or lower data.num_proc "
                        f"(now {procs}), and run again") from None


@contextlib.contextmanager
def _forked_pool(procs: int, job: tuple):
    """A pool of forked workers (they inherit the tokenizer and template; nothing is pickled but the chunks),
    each tokenizing in its one thread: the fast tokenizer's own threads would only contend with the workers,
    and after a fork it would warn and turn them off anyway. What the workers import after the fork, each
    imports again. concurrent.futures' pool, not multiprocessing's: a worker that dies breaks it (every
    pending result raises, the other workers are stopped), where multiprocessing's replaces the worker and
    waits for the lost chunk forever, and its terminate() can hang on a queue lock the dead worker held. On the
    way out the chunks being encoded finish (a fraction of a second) and the queued ones are dropped."""
    from concurrent.futures import ProcessPoolExecutor

    import pyarrow as pa

    pa.array([])  # pyarrow imports pandas at its first array (0.5-0.7 s): once here; workers inherit it
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers fork at the first submit: set while the pool lives
    pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("fork"), initializer=_adopt,
                               initargs=(job,))  # fmt: skip
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
