"""The key-value metadata of a GGUF file (llama.cpp's documented format, little-endian), read without its
tensors: gguf's GGUFReader builds a numpy view per array element, seconds for a 50k-token vocabulary,
where the export's checks need a few keys."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from sftlab.export.merge import ExportError

# GGUF value types: struct format of the scalars, by type number (8 string and 9 array are read apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ExportError):
    pass


def read_metadata(path: str | Path) -> dict:
    """{key: value} of the file's metadata: numbers, bools, strings, and lists of them."""
    if Path(path).stat().st_size < 24:  # magic, version, tensor and key counts
        raise GGUFFormatError(f"{path}: not a GGUF file ({Path(path).stat().st_size} bytes, shorter than its header)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise GGUFFormatError(f"{path}: not a GGUF file (it starts with {data[:4]!r})")
        version, _tensors, count = struct.unpack_from("<IQQ", data, 4)
        if not 2 <= version <= 3:
            raise GGUFFormatError(f"{path}: GGUF version {version} (a big-endian file, or not v2/v3)")
        reader = _Reader(data, path)
        try:
            return {reader.string(): reader.value(reader.unpack("I")) for _ in range(count)}
        except struct.error:
            raise GGUFFormatError(f"{path}: the metadata runs past the end of the file") from None


class _Reader:
    def __init__(self, data, path):
        self.data, self.pos, self.path = data, 24, path  # after magic, version, tensor and key counts

    def unpack(self, fmt: str, n: int = 1):
        values = struct.unpack_from(f"<{n}{fmt}", self.data, self.pos)
        self.pos += struct.calcsize(f"<{n}{fmt}")
        return values[0] if n == 1 else list(values)

    def string(self) -> str:
        n = self.unpack("Q")
        if self.pos + n > len(self.data):
            raise struct.error("short")
        self.pos += n
        return self.data[self.pos - n : self.pos].decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.unpack("I"), self.unpack("Q")
            if item in _SCALARS:
                return self.unpack(_SCALARS[item], n) if n != 1 else [self.unpack(_SCALARS[item])]
            return [self.value(item) for _ in range(n)]
        if kind not in _SCALARS:
            raise GGUFFormatError(f"{self.path}: unknown GGUF value type {kind} at byte {self.pos}")
        return self.unpack(_SCALARS[kind])
