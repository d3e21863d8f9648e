"""The module graph stays acyclic and layered (pyproject.toml's [tool.importlinter] contracts)."""

import sys
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_sftlab_keeps_its_import_contracts(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_an_import_inside_a_function_counts_as_a_cycle(tmp_path, monkeypatch):
    """The contracts see imports wherever they are written, so a cycle cannot hide in a function body."""
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic import b\n")
    (package / "b.py").write_text("def late():\n    from cyclic import a\n    return a\n")
    config = tmp_path / ".importlinter"
    config.write_text("[importlinter]\nroot_package = cyclic\n\n[importlinter:contract:acyclic]\n"
                      "name = no cycles\ntype = acyclic_siblings\nancestors = cyclic\n")  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert lint_imports(config_filename=str(config), no_cache=True, no_logo=True) == 1
    (package / "b.py").write_text("def late():\n    return None\n")
    sys.modules.pop("cyclic", None)
    assert lint_imports(config_filename=str(config), no_cache=True, no_logo=True) == 0
