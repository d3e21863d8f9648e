"""llama.cpp's own GGUF tools: its converter scripts and its quantizer, never a converter of ours.

The converter (convert_hf_to_gguf.py, convert_lora_to_gguf.py, their `conversion` package and the
gguf-py they import) ships in no wheel; it is in llama-cpp-python's source package under
vendor/llama.cpp. `converter_dir` downloads that pinned package once with pip and unpacks only
those parts into the cache. k-quants (q4_k_m, ...) are llama.cpp's C code, reached through
llama-cpp-python's binding of `llama_model_quantize` where that package is installed (`make
llama-cpp` builds it from the same pinned source).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from sftlab.errors import SftlabError
from sftlab.files import cache_root

LLAMA_CPP_PYTHON = "0.3.36"  # pinned: the converter's gguf-py and the C library come from one llama.cpp
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py", "LICENSE")
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by the converter itself
# the legacy and k-quant types llama.cpp's quantizer writes, by the names llama-quantize takes
QUANT_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
               "q5_k_s", "q5_k_m", "q6_k")  # fmt: skip
SDIST_ENV = "SFTLAB_LLAMA_CPP_SDIST"  # a downloaded llama_cpp_python-*.tar.gz, for machines without PyPI
INSTALL_HINT = "make llama-cpp (builds llama-cpp-python==" + LLAMA_CPP_PYTHON + " from source, a few minutes)"


class LlamaCppError(SftlabError):
    pass


def converter_dir() -> Path:
    """The unpacked converter, fetched on first use."""
    root = cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if not (root / CONVERTER_PARTS[0]).is_file():
        _unpack(source_package(), root)
    return root


def source_package() -> Path:
    """The pinned llama-cpp-python source package: $SFTLAB_LLAMA_CPP_SDIST, the cached one, or from PyPI."""
    if os.environ.get(SDIST_ENV):
        return Path(os.environ[SDIST_ENV])
    into = cache_root() / "sources"
    found = sorted(into.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if found:
        return found[0]
    print(f"fetching llama.cpp's source (llama-cpp-python=={LLAMA_CPP_PYTHON}, ~75 MB; once)", flush=True)
    into.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
           "-d", str(into), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]  # fmt: skip
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    found = sorted(into.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if done.returncode != 0 or not found:
        raise LlamaCppError(f"could not download llama.cpp's source with pip: {_tail(done.stderr)}\n"
                            f"download llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz elsewhere and set {SDIST_ENV}")  # fmt: skip
    return found[0]


def _unpack(sdist: Path, root: Path) -> None:
    """Only the converter's parts, checked to be there (the vendored tree moves between releases)."""
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        top = tar.next()
        base = f"{top.name.split('/')[0]}/vendor/llama.cpp/" if top is not None else ""
        members = [m for m in tar.getmembers() if m.name.startswith(base)
                   and m.name[len(base):].split("/")[0] in CONVERTER_PARTS]  # fmt: skip
        for m in members:
            m.name = m.name[len(base):]
        tar.extractall(staging, members=members, filter="data")
    missing = [p for p in CONVERTER_PARTS if not (staging / p).exists()]
    if missing:
        raise LlamaCppError(f"{sdist}: vendor/llama.cpp lacks {', '.join(missing)}; pin another llama-cpp-python")
    staging.rename(root)


def convert(model_dir: Path, outfile: Path, outtype: str) -> None:
    """convert_hf_to_gguf.py on a Hugging Face model directory."""
    _run(["convert_hf_to_gguf.py", str(model_dir), "--outtype", outtype, "--outfile", str(outfile)], model_dir)


def convert_lora(adapter_dir: Path, base_dir: Path, outfile: Path, outtype: str = "f16") -> None:
    """convert_lora_to_gguf.py: a PEFT LoRA adapter as a GGUF LoRA (Ollama's ADAPTER, llama.cpp's --lora)."""
    args = [str(adapter_dir), "--base", str(base_dir), "--outtype", outtype, "--outfile", str(outfile)]
    _run(["convert_lora_to_gguf.py", *args], adapter_dir)


def _run(argv: list[str], source: Path) -> None:
    tools = converter_dir()
    env = {**os.environ, "PYTHONPATH": str(tools / "gguf-py") + os.pathsep + str(tools)}
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use the gguf-py it was released with
    cmd = [sys.executable, str(tools / argv[0]), *argv[1:]]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise LlamaCppError(f"llama.cpp's {argv[0]} failed on {source}: {_tail(done.stderr)}")


def quantize(source: Path, out: Path, qtype: str) -> None:
    """llama.cpp's quantizer (the C library's llama_model_quantize, as `llama-quantize` runs it)."""
    llama_cpp = load_llama_cpp(f"--quant {qtype}")
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if ftype is None:
        raise LlamaCppError(f"llama.cpp {LLAMA_CPP_PYTHON} has no quantization type {qtype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    with tempfile.TemporaryFile(mode="w+") as log:
        with _c_output_to(log):  # llama.cpp logs every tensor it writes
            failed = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
        if failed:
            log.seek(0)
            raise LlamaCppError(f"llama.cpp could not quantize {source} to {qtype}: {_tail(log.read())}")


@contextlib.contextmanager
def _c_output_to(file):
    """stdout and stderr of C code (file descriptors 1 and 2) into `file` for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def load_llama_cpp(why: str):
    try:
        import llama_cpp
    except ImportError as e:
        raise LlamaCppError(f"{why} needs llama.cpp's quantizer (llama-cpp-python): {INSTALL_HINT}") from e
    return llama_cpp


def have_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _tail(text: str, lines: int = 6) -> str:
    kept = [line for line in (text or "").strip().splitlines() if line.strip()][-lines:]
    return "\n  ".join(kept) or "(no output)"


# Portable x86-64 (AVX2): a native build also uses AMX and AVX-512 kernels, which some virtual machines
# that report those features refuse at run time (illegal instruction in the q4/q8 paths).
PORTABLE_X86 = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
                "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF")  # fmt: skip


def install() -> None:
    """`make llama-cpp`: the converter, then llama-cpp-python built once from the same source (the wheel
    cached under $SFTLAB_CACHE/wheels, ~10 minutes on 2 cores) and installed."""
    converter_dir()
    wheels = cache_root() / "wheels"
    built = sorted(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}-*.whl"))
    if not built:
        env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
        if platform.machine() in ("x86_64", "AMD64"):
            env["CMAKE_ARGS"] = (env.get("CMAKE_ARGS", "") + " " + PORTABLE_X86).strip()
        print(f"building llama-cpp-python {LLAMA_CPP_PYTHON} (a few minutes)", flush=True)
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source_package())]
        subprocess.run(cmd, check=True, env=env)
        built = sorted(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}-*.whl"))
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "diskcache>=5.6", "jinja2>=2.11.3", "typing-extensions>=4.5"], check=True)
    subprocess.run([*pip, "--no-deps", str(built[0])], check=True)


if __name__ == "__main__":
    install()
