"""The torch-free names of catalog.py against what the library implements, and the cheap start-up they allow."""

from __future__ import annotations

import subprocess
import sys

import pytest

from implicit_attention import catalog


def test_variants_are_the_registered_ones():
    from implicit_attention.architectures import architectures

    registered = {variant for arch in architectures() for variant in arch.variants}
    assert set(catalog.VARIANTS) == registered
    assert len(catalog.VARIANTS) == len(set(catalog.VARIANTS)) and catalog.VARIANTS[0] == "unified"
    assert all(arch.variants[0] == "unified" for arch in architectures())


def test_methods_and_aggregates_are_the_implemented_ones():
    from implicit_attention.architectures import base
    from implicit_attention.explanations import api, combination, methods

    assert catalog.METHODS == catalog.MATRIX_METHODS + catalog.BASELINE_METHODS
    assert api.MATRIX_METHODS is catalog.MATRIX_METHODS and combination.MATRIX_METHODS is catalog.MATRIX_METHODS
    assert tuple(methods.METHOD_CLASSES) == catalog.METHODS
    assert all(issubclass(methods.METHOD_CLASSES[name], methods.MatrixMethod) for name in catalog.MATRIX_METHODS)
    assert all(issubclass(methods.METHOD_CLASSES[name], methods.BaselineMethod) for name in catalog.BASELINE_METHODS)
    own_flags = {"dtype", "variant", "layers", "check", "tolerance", "progress", "aggregate"}
    assert catalog.METHOD_OPTIONS == {name: tuple(o for o in cls.option_names() if o not in own_flags)
                                      for name, cls in methods.METHOD_CLASSES.items()}
    assert base.AGGREGATES is catalog.AGGREGATES
    with pytest.raises(ValueError, match="how must be one of"):
        base.check_aggregate("median")


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_import_and_help_do_not_import_torch():
    out = _run("import sys, contextlib, io\n"
               "import implicit_attention as ia\n"
               "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
               "from implicit_attention.cli import main\n"
               "with contextlib.redirect_stdout(io.StringIO()) as help_text:\n"
               "    code = main(['explain', '--help'])\n"
               "print(code, 'torch' in sys.modules, '--variant' in help_text.getvalue())\n"
               "with contextlib.redirect_stdout(io.StringIO()) as version:\n"
               "    main(['--version'])\n"
               "print('torch' in sys.modules, 'torch ' in version.getvalue())\n"
               "ia.decompose\n"
               "print('torch' in sys.modules)\n")
    assert out.split() == ["False", "False", "0", "False", "True", "False", "True", "True"]


@pytest.mark.parametrize("order", ["package first", "transformers first", "config only"])
def test_our_models_join_the_auto_classes(order):
    """Whatever is imported first, AutoConfig and AutoModelForCausalLM know our model types when called."""
    first = {"package first": "import implicit_attention\nfrom transformers import AutoConfig, AutoModelForCausalLM\n",
             "transformers first": "from transformers import AutoConfig, AutoModelForCausalLM\nimport implicit_attention\n",
             "config only": "import implicit_attention\nfrom transformers.models.auto.configuration_auto import AutoConfig\n"}
    out = _run(first[order] +
               "config = AutoConfig.for_model('ia_gla', hidden_size=16, num_heads=2, num_hidden_layers=1, vocab_size=20)\n"
               "from transformers import AutoModelForCausalLM\n"
               "model = AutoModelForCausalLM.from_config(config)\n"
               "print(type(config).__name__, type(model).__name__, type(model).__module__)\n")
    assert out.split() == ["GLAConfig", "GLAForCausalLM", "implicit_attention.models.gla.modeling_gla"]
