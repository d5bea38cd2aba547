"""Architecture discovery: our own errors fail loudly, a missing optional dependency is skipped and reported."""

from __future__ import annotations

import sys
import textwrap

import pytest

from implicit_attention.architectures import registry


def _package(root, name: str, subpackages: dict[str, str]):
    """A package ``name`` under ``root`` whose sub-packages have the given ``__init__`` sources."""
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "plain_module.py").write_text("raise RuntimeError('flat modules are not architectures')\n")
    for sub, source in subpackages.items():
        (package / sub).mkdir()
        (package / sub / "__init__.py").write_text(textwrap.dedent(source))
    return package


@pytest.fixture
def fresh_registry(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_SKIPPED", {})
    monkeypatch.setattr(registry, "_REGISTRY", list(registry._REGISTRY))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("fake_archs")]:
        del sys.modules[name]


def test_missing_third_party_dependency_is_skipped_with_its_reason(fresh_registry):
    package = _package(fresh_registry, "fake_archs_a", {
        "needs_dep": "import some_missing_kernel_library_xyz\n",
        "works": """
            from implicit_attention.architectures.registry import Architecture, register
            register(Architecture("fake_works", (), (), ("unified",), None, None, lambda m: 1))
            """,
    })
    registry.discover("fake_archs_a", [str(package)])
    assert "fake_works" in [arch.name for arch in registry.architectures()]
    reason = registry.skipped_architectures()["needs_dep"]
    assert "some_missing_kernel_library_xyz" in reason and "not installed" in reason


def test_an_error_in_our_own_code_is_raised(fresh_registry):
    package = _package(fresh_registry, "fake_archs_b", {"broken": "x = undefined_name\n"})
    with pytest.raises(NameError, match="undefined_name"):
        registry.discover("fake_archs_b", [str(package)])


def test_a_missing_module_of_our_own_is_raised(fresh_registry):
    package = _package(fresh_registry, "fake_archs_c", {"typo": "from implicit_attention.architectures import nope\n"})
    with pytest.raises(ImportError, match="nope"):
        registry.discover("fake_archs_c", [str(package)])
    package = _package(fresh_registry, "fake_archs_d", {"typo": "import implicit_attention.no_such_module\n"})
    with pytest.raises(ModuleNotFoundError, match="implicit_attention.no_such_module"):
        registry.discover("fake_archs_d", [str(package)])
    assert registry.skipped_architectures() == {}


def test_info_lists_skipped_architectures(monkeypatch, capsys):
    from implicit_attention import cli

    monkeypatch.setattr(registry, "_SKIPPED", {"fancy": "needs the 'fancy_kernels' package, which is not installed"})
    assert cli.main(["info"]) == 0
    assert "not available: the fancy architectures (needs the 'fancy_kernels' package" in capsys.readouterr().out
