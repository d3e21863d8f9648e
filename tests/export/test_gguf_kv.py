"""sftlab.export.gguf_kv reads a GGUF file's metadata as gguf's own reader does, and fails on a bad file by name."""

import numpy as np
import pytest

from sftlab.export.gguf_kv import GGUFFormatError, read_metadata


def _written(path):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 7), writer.add_int8("t.i8", -7), writer.add_uint16("t.u16", 65535)
    writer.add_int16("t.i16", -3), writer.add_uint32("t.u32", 4_000_000_000), writer.add_int32("t.i32", -5)
    writer.add_float32("t.f32", 0.5), writer.add_uint64("t.u64", 2**60), writer.add_int64("t.i64", -(2**60))
    writer.add_float64("t.f64", 1 / 3), writer.add_bool("t.yes", True), writer.add_bool("t.no", False)
    writer.add_string("t.text", "héllo <|im_end|>\n{{ messages }}")
    writer.add_array("t.words", ["a", "", "ü" * 300]), writer.add_array("t.ints", [3, 1, 2])
    writer.add_array("t.floats", [0.25, -1.5]), writer.add_array("t.one", [9])
    writer.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_metadata_is_what_ggufs_own_reader_reads(tmp_path):
    from gguf import GGUFReader

    path = _written(tmp_path / "m.gguf")
    meta = read_metadata(path)
    theirs = {k: f.contents() for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    assert meta.keys() == theirs.keys()
    for key, value in theirs.items():
        assert meta[key] == pytest.approx(value) if isinstance(value, float) else meta[key] == value, key
    assert meta["t.words"] == ["a", "", "ü" * 300] and meta["t.one"] == [9]


def test_a_bad_file_is_named_not_a_traceback(tmp_path):
    good = _written(tmp_path / "m.gguf").read_bytes()
    (tmp_path / "text.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFFormatError, match=r"text\.gguf: not a GGUF file"):
        read_metadata(tmp_path / "text.gguf")
    (tmp_path / "cut.gguf").write_bytes(good[:200])
    with pytest.raises(GGUFFormatError, match=r"cut\.gguf: the metadata runs past the end"):
        read_metadata(tmp_path / "cut.gguf")
    (tmp_path / "v9.gguf").write_bytes(good[:4] + (9).to_bytes(4, "little") + good[8:])
    with pytest.raises(GGUFFormatError, match="GGUF version 9"):
        read_metadata(tmp_path / "v9.gguf")


@pytest.mark.parametrize("content", [b"", b"GGUF", b"GGUF" + bytes(19)])
def test_an_empty_or_headless_file_is_named(tmp_path, content):
    (tmp_path / "short.gguf").write_bytes(content)
    with pytest.raises(GGUFFormatError, match=rf"short\.gguf: not a GGUF file \({len(content)} bytes"):
        read_metadata(tmp_path / "short.gguf")
