"""Training on CPU: the glibc heap settings."""

import pytest

from sftlab.speed import cpu


def test_heap_settings_apply_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert cpu.keep_freed_memory()
    assert cpu.use_cores() >= 1
