"""What the library offers, by name, importable without torch.

The command line builds its parser from these names, so that ``implicit-attention --help`` starts
without importing torch or transformers. Each tuple is the one source of its names: the modules
that implement them import them from here (:data:`VARIANTS` is the union of what the registered
architectures offer; ``tests/test_catalog.py`` checks it against the registry).
"""

from __future__ import annotations

#: Methods built on the implicit attention matrices (they honour ``variant``).
MATRIX_METHODS: tuple[str, ...] = ("raw", "rollout", "attribution", "signed_attribution", "paper")
#: Methods that only use the model's gradients or outputs.
BASELINE_METHODS: tuple[str, ...] = ("random", "grad_x_input", "integrated_gradients", "occlusion", "smoothgrad",
                                     "lrp")
#: Every explanation method.
METHODS: tuple[str, ...] = MATRIX_METHODS + BASELINE_METHODS

#: The options of each method that the command line sets with ``--option NAME=VALUE`` (those with a
#: flag of their own, ``--variant``, ``--layers``, ``--aggregate``, ``--dtype``, ``--no-check``, aside);
#: ``tests/test_catalog.py`` checks them against the method classes.
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "raw": (), "rollout": (), "attribution": ("signed",), "signed_attribution": (), "paper": ("start_layer",),
    "random": ("seed",), "grad_x_input": (), "integrated_gradients": ("steps", "baseline"),
    "occlusion": ("window", "replacement"), "smoothgrad": ("samples", "noise", "seed"), "lrp": (),
}


#: What each method option accepts: ``(kind, minimum)``; kind ``"int"``, ``"float"``, ``"bool"``, or
#: ``"token"`` (``"zeros"`` or a token id).
OPTION_KINDS: dict[str, tuple[str, float | None]] = {
    "signed": ("bool", None), "start_layer": ("int", None), "seed": ("int", 0), "steps": ("int", 1),
    "baseline": ("token", 0), "replacement": ("token", 0), "window": ("int", 1), "samples": ("int", 1),
    "noise": ("float", 0),
}


def check_option_value(name: str, value) -> None:
    """Raise ``ValueError`` unless ``value`` is what option ``name`` accepts (see :data:`OPTION_KINDS`)."""
    kind, minimum = OPTION_KINDS[name]
    if value is None and name == "start_layer":
        return
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = is_int and (minimum is None or value >= minimum)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= minimum
    else:
        ok = value == "zeros" or (is_int and value >= 0)
    if not ok:
        wanted = {"bool": "true or false", "token": "'zeros' or a token id (an integer >= 0)",
                  "int": "an integer" + (f" >= {minimum}" if minimum is not None else ""),
                  "float": f"a number >= {minimum}"}[kind]
        raise ValueError(f"option {name} must be {wanted}, got {value!r}")


def check_method_options(method: str, options: dict) -> None:
    """Raise ``ValueError`` for options that ``method`` does not take (see :data:`METHOD_OPTIONS`) or values
    it does not accept (see :data:`OPTION_KINDS`)."""
    wrong = sorted(set(options) - set(METHOD_OPTIONS.get(method, ())))
    if wrong:
        takes = ", ".join(METHOD_OPTIONS.get(method, ())) or "no options of its own"
        raise ValueError(f"method {method!r} does not take {', '.join(wrong)}; it takes {takes}")
    for name, value in options.items():
        check_option_value(name, value)


#: Why rollout refuses the signed channel mean.
ROLLOUT_NEEDS_NON_NEGATIVE = (
    "rollout multiplies row-normalised maps and needs them non-negative: aggregate='mean' is the signed channel "
    "mean, whose row sums can be zero or negative; use 'abs' or 'pos' (the signed mean is available with "
    "method='raw')")

#: Channel aggregations of the per-channel matrices: signed mean, mean of ``|A|``, mean of ``relu(A)``.
AGGREGATES: tuple[str, ...] = ("mean", "abs", "pos")

#: Every formulation a registered architecture offers; ``unified`` (the exact one) first.
VARIANTS: tuple[str, ...] = ("unified", "recurrence", "rglru", "no_conv", "no_gate", "s6", "no_act", "ssd",
                             "no_shift", "wkv", "mlstm", "delta")

#: Scores of a target that the text tools explain: the label contrast, the logit, the log-probability.
SCORES: tuple[str, ...] = ("contrast", "logit", "log_prob")

#: Compute dtypes by name.
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "float64")
#: Dtypes a text model may be loaded and run in (the command line's ``--dtype``): the decomposition of a
#: float16 / bfloat16 model computes in float32.
MODEL_DTYPES: tuple[str, ...] = COMPUTE_DTYPES + ("float16", "bfloat16")

__all__ = ["AGGREGATES", "BASELINE_METHODS", "COMPUTE_DTYPES", "MATRIX_METHODS", "METHODS", "METHOD_OPTIONS",
           "MODEL_DTYPES",
           "OPTION_KINDS", "ROLLOUT_NEEDS_NON_NEGATIVE", "check_method_options", "check_option_value", "SCORES", "VARIANTS"]
