"""The model's input: validating token ids or pixels, and running the model on them.

:class:`ModelInputs` is the adapter between the user's input (token ids or images) and everything
that runs the model or reads relevance per token (:func:`~implicit_attention.decompose`,
:func:`~implicit_attention.explain`, the baselines).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .architectures import find_layers
from .architectures.registry import model_layers
from .devices import float64_experts_error, model_device, model_dtype, triton_without_gpu_error
from .errors import EmptyInputError


def as_module(model) -> nn.Module:
    """The ``nn.Module`` to run: ``model`` itself, or the model inside a
    :class:`~implicit_attention.loading.LoadedModel` (anything with ``.model`` and ``.tokenizer``)."""
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module) \
            and hasattr(model, "tokenizer"):
        return model.model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
    return model


def _is_text(value) -> bool:
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and bool(value)
                                      and all(isinstance(v, str) for v in value))


def prepare_inputs(model: nn.Module, input_ids, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate ``input_ids`` (``[L]``, ``[B, L]``, list or tensor) and the mask; move them to the model.

    Returns ``input_ids [B, L]`` (long) and ``attention_mask [B, L]`` (long) or ``None``.
    Raises :class:`EmptyInputError` for an empty input or a row with no real token.
    """
    if _is_text(input_ids):
        raise TypeError("input_ids must be token ids ([L] or [B, L] integers), got text: tokenise it first, or "
                        "explain raw strings with implicit_attention.explain_texts(implicit_attention.load_model("
                        "...), texts), which applies the model's prompt template and tokenizer")
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [L] or [B, L], got shape {tuple(ids.shape)}")
    if ids.numel() == 0 or ids.shape[1] == 0:
        raise EmptyInputError("input_ids is empty: there is nothing to explain (empty text?)")
    if ids.is_floating_point():
        raise TypeError("input_ids must hold integer token ids")
    _check_vocabulary(model, ids)
    device = model_device(model)
    ids = ids.long().to(device)
    mask = None
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
        mask = mask.long().to(device)
        if (mask.sum(dim=1) == 0).any():
            raise EmptyInputError("a row of attention_mask has no real token (all padding)")
    return ids, mask


def _check_vocabulary(model: nn.Module, ids: torch.Tensor) -> None:
    """Refuse a token id outside the model's input embedding table, naming it and the vocabulary size
    (rather than the embedding's "index out of range in self")."""
    try:
        table = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return
    vocab = getattr(table, "num_embeddings", None)
    if not isinstance(vocab, int):
        return
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"token id {int(ids[row, col])} (row {row}, position {col}) is outside the model's "
                         f"vocabulary of {vocab} ids: ids must lie in [0, {vocab})")


def first_tensor(args, kwargs, key: str) -> torch.Tensor:
    return args[0] if args else kwargs[key]


def call_model(model: nn.Module, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
               inputs_embeds: torch.Tensor | None = None):
    """Run ``model`` on ids (or embeddings) and the mask, without a cache where the model has one.

    With left padding in the mask, a model that takes ``position_ids`` gets each row's positions
    shifted back by its left padding (0 on the padding): each text's tokens keep the positions they
    have alone (GPT-2's absolute positions would otherwise shift by the padding). Rows padded on
    the right keep the default positions.
    """
    kwargs = {"attention_mask": attention_mask}
    if inputs_embeds is not None:
        kwargs["inputs_embeds"] = inputs_embeds
    else:
        kwargs["input_ids"] = input_ids
    parameters = inspect.signature(model.forward).parameters
    if "use_cache" in parameters:
        kwargs["use_cache"] = False
    if attention_mask is not None and "position_ids" in parameters:
        left = (attention_mask.long().cumsum(dim=-1) == 0).sum(dim=-1)          # [B] left padding per row
        if bool(left.any()):
            positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
            kwargs["position_ids"] = (positions[None, :] - left[:, None]).clamp(min=0)
    try:
        return model(**kwargs)
    except RuntimeError as error:  # float64 refused by grouped-matmul experts, fla's kernels on a CPU: say so
        if (clear := float64_experts_error(model, error) or triton_without_gpu_error(model, error)) is not None:
            raise clear from error
        raise


def run_model(model: nn.Module, name: str, values: torch.Tensor, attention_mask: torch.Tensor | None,
              embeds: torch.Tensor | None = None):
    """Run ``model`` on its main input ``name`` (``"input_ids"`` or ``"pixel_values"``).

    ``embeds`` replaces what ``model.get_input_embeddings()`` computes (token embeddings, fed
    as ``inputs_embeds``; patch embeddings, substituted by a forward hook since vision models
    take no ``inputs_embeds``).
    """
    if name != "pixel_values":
        return call_model(model, values if embeds is None else None, attention_mask, inputs_embeds=embeds)
    kwargs = {"pixel_values": values}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if embeds is None:
        return model(**kwargs)
    handle = model.get_input_embeddings().register_forward_hook(lambda module, args, output: embeds)
    try:
        return model(**kwargs)
    finally:
        handle.remove()


def is_causal_model(model: nn.Module) -> bool:
    """``False`` when every token-mixing layer is bidirectional (``is_causal = False``: BERT, ViT)."""
    layers = find_layers(model)
    return not (layers and all(getattr(module, "is_causal", True) is False for _, module, _ in layers))


@dataclass
class ModelInputs:
    """One batch of model input in the form the model takes, and how its tokens line up with it.

    The adapter between the user's input (token ids or images) and everything that runs the
    model or reads relevance per token (:func:`~implicit_attention.decompose`,
    :func:`~implicit_attention.explain`, the baselines).

    Attributes:
        name: the model's main input, ``"input_ids"`` or ``"pixel_values"``.
        values: ``[B, L]`` token ids (long) or ``[B, channels, height, width]`` pixels.
        attention_mask: ``[B, L]`` (long) or ``None``.
        length: ``L``, the tokens the token-mixing layers see (patches plus class tokens for images).
        causal: whether the model mixes tokens causally (``False`` when all its layers are bidirectional).
        class_token: position of the class token of a bidirectional model: for images found from
            the model (the first token that does not come from a patch), for text encoders the
            first token (``[CLS]``); ``None`` for causal models.
        patch_positions: ``[P]`` token position of each patch embedding in patch order (images only).
    """

    name: str
    values: torch.Tensor
    attention_mask: torch.Tensor | None
    length: int
    causal: bool
    class_token: int | None = None
    patch_positions: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, L)``, the token grid (what ``input_ids.shape`` is for text)."""
        return self.values.shape[0], self.length

    @property
    def device(self) -> torch.device:
        return self.values.device

    def classifier_row(self) -> int:
        """Row of the ``[L, L]`` maps that a sequence classifier's logits ``[B, K]`` are read from.

        The class token of a bidirectional model; the last token of a causal one (pad on the left).
        """
        if self.causal:
            return self.length - 1
        if self.class_token is None:
            raise ValueError("this bidirectional model has no class token to explain the class logits from")
        return self.class_token

    def token_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """``[B, L]`` 1 for real tokens, 0 for padding."""
        if self.attention_mask is None:
            return torch.ones(self.shape, dtype=dtype, device=self.device)
        return self.attention_mask.to(dtype)

    def embed(self, model: nn.Module) -> torch.Tensor:
        """What ``model.get_input_embeddings()`` makes of the input (detached): ``[B, L, H]`` token
        embeddings, or ``[B, P, H]`` patch embeddings for images."""
        with torch.no_grad():
            return model.get_input_embeddings()(self.values).detach()

    def call(self, model: nn.Module, embeds: torch.Tensor | None = None):
        """Run ``model`` on this input (no cache), ``embeds`` replacing :meth:`embed`'s result if given."""
        return run_model(model, self.name, self.values, self.attention_mask, embeds)

    def to_tokens(self, relevance: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` from relevance per embedding ``[B, L]`` (text) or per patch ``[B, P]`` (class tokens get 0)."""
        if self.patch_positions is None:
            return relevance
        tokens = relevance.new_zeros(relevance.shape[0], self.length)
        return tokens.index_copy(1, self.patch_positions.to(relevance.device), relevance)


class _StopForward(Exception):
    """Raised by a probe hook to end a forward pass early, carrying the tensor it saw."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__("probe")
        self.tensor = tensor


def patch_positions(model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(positions [P], L)``: where each patch embedding enters the token sequence, read off the model.

    Runs the model up to its first token-mixing layer twice with two different random patch
    embeddings: the tokens that change come from patches, the others (class / distillation
    tokens) do not. Patches are assumed to keep their order (ViT, DeiT, Vision Mamba).
    """
    found = model_layers(model)
    first, embedding = found[0][1], model.get_input_embeddings()
    sample = pixel_values[:1]
    with torch.no_grad():
        patches = embedding(sample)
        seen = []
        for seed in (0, 1):
            fake = torch.randn(patches.shape, generator=torch.Generator().manual_seed(seed),
                               dtype=torch.float64).to(patches)

            def stop(module, args, kwargs):
                raise _StopForward(first_tensor(args, kwargs, "hidden_states"))

            handles = [embedding.register_forward_hook(lambda module, args, output: fake),
                       first.register_forward_pre_hook(stop, with_kwargs=True)]
            try:
                run_model(model, "pixel_values", sample, None)
            except _StopForward as probe:
                seen.append(probe.tensor)
            finally:
                for handle in handles:
                    handle.remove()
    if len(seen) != 2:
        raise RuntimeError(f"{type(model).__name__} never reached its first token-mixing layer {found[0][0]!r}")
    changed = (seen[0] - seen[1]).abs().flatten(2).amax(dim=-1)[0] > 0       # [L]
    positions = changed.nonzero()[:, 0]
    if len(positions) != patches.shape[1]:
        raise RuntimeError(f"could not locate the {patches.shape[1]} patches among the {changed.numel()} tokens "
                           f"of {type(model).__name__}")
    return positions, changed.numel()


def prepare_model_inputs(model: nn.Module, inputs, attention_mask=None) -> ModelInputs:
    """Validate the input for ``model`` (ids, or pixels when ``model.main_input_name == "pixel_values"``).

    Token ids are checked by :func:`prepare_inputs`. Pixels are ``[channels, height, width]`` or
    ``[B, channels, height, width]`` floats, cast to the model's device and dtype; images take no
    ``attention_mask``.
    """
    if isinstance(inputs, ModelInputs):
        return inputs
    causal = is_causal_model(model)
    if getattr(model, "main_input_name", "input_ids") != "pixel_values":
        ids, mask = prepare_inputs(model, inputs, attention_mask)
        return ModelInputs("input_ids", ids, mask, ids.shape[1], causal, class_token=None if causal else 0)
    pixels = torch.as_tensor(inputs)
    if pixels.dim() == 3:
        pixels = pixels.unsqueeze(0)
    if pixels.dim() != 4:
        raise ValueError(f"pixel_values must be [channels, height, width] or [B, channels, height, width], "
                         f"got shape {tuple(pixels.shape)}")
    if pixels.numel() == 0:
        raise EmptyInputError("pixel_values is empty: there is nothing to explain")
    if not pixels.is_floating_point():
        raise TypeError("pixel_values must hold floating-point pixels")
    if attention_mask is not None:
        raise ValueError("attention_mask is for token ids; image models take pixel_values alone")
    pixels = pixels.to(device=model_device(model), dtype=model_dtype(model))
    positions, length = patch_positions(model, pixels)
    extra = [i for i in range(length) if i not in set(positions.tolist())]
    return ModelInputs("pixel_values", pixels, None, length, causal,
                       class_token=extra[0] if extra else None, patch_positions=positions)
