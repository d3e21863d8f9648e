"""metrics.jsonl on resume: one owner, and a half-written last line is not an error."""

import json

from sftlab.loop.tracking import MetricsLog
from sftlab.rundir import read_metrics


def _rows(path, steps):
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps))


def test_only_the_main_process_truncates_or_writes_the_log(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _rows(path, [1, 2, 3, 4])
    before = path.read_text()
    other = MetricsLog(tmp_path, [], resume_step=2, main=False)
    other.log({"step": 3, "loss": 0.5})
    assert path.read_text() == before  # another rank leaves rank 0's file alone
    MetricsLog(tmp_path, [], resume_step=0, main=False)
    assert path.is_file()

    main = MetricsLog(tmp_path, [], resume_step=2)
    main.log({"step": 3, "loss": 0.5})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_a_line_cut_off_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _rows(path, [1, 2])
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # the kill came mid-write
    MetricsLog(tmp_path, [], resume_step=2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
