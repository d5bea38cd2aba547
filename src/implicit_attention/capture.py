"""Input validation and forward hooks that record what each token-mixing layer saw and produced."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import dataclasses
import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .architectures import CapturedLayer, find_layers, supported_model_classes
from .architectures.registry import Architecture
from .errors import EmptyInputError, UnsupportedModelError


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: the execution device ``accelerate`` gave it, else its parameters' device.

    A model loaded with ``device_map`` has its layers on several devices; ``accelerate`` moves each
    dispatched module's inputs to its execution device when it is called.
    """
    hooks = [getattr(module, "_hf_hook", None)]
    hooks += list(getattr(hooks[0], "hooks", ()))  # a SequentialHook holds several
    for hook in hooks:
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    param = next((p for p in module.parameters() if not p.is_meta), None)
    return param.device if param is not None else torch.device("cpu")


def on_device(device: torch.device | str):
    """Make ``device`` the current CUDA device inside the context (a no-op for other devices).

    Kernels that launch on the current device (Triton's, and tensors created with a bare
    ``device="cuda"``) then run on the GPU of the layer being decomposed, not on ``cuda:0``.
    """
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def offloaded_parameters(module: nn.Module) -> list[str]:
    """Names of ``module``'s parameters that live on the ``meta`` device (offloaded by ``accelerate``)."""
    return [name for name, p in module.named_parameters() if p.is_meta]


def to_device(value, device: torch.device):
    """``value`` with every tensor inside (tuples, lists, dicts) moved to ``device``; tensors already there kept."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def record_on_device(record: CapturedLayer, device: torch.device | None = None) -> CapturedLayer:
    """A copy of ``record`` whose tensors sit on ``device`` (default: the layer's :func:`execution_device`).

    The forward hooks run before ``accelerate`` moves a dispatched module's arguments, so with a
    ``device_map`` that places a layer apart from its caller the captured input can sit on the
    previous device; the layer's factors are recomputed from its parameters, on its own device.
    ``output`` (kept attached to autograd for gradients) is detached in the copy; the original
    record is left as it is.
    """
    device = execution_device(record.module) if device is None else torch.device(device)
    output = None if record.output is None else to_device(record.output.detach(), device)
    return dataclasses.replace(
        record, inputs=to_device(record.inputs, device), attention_mask=to_device(record.attention_mask, device),
        output=output, block_input=None, kwargs=to_device(record.kwargs, device),
        module_output=to_device(record.module_output, device), extra=to_device(record.extra, device))


def model_dtype(model: nn.Module) -> torch.dtype:
    """Floating dtype of the model's first floating parameter."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def prepare_inputs(model: nn.Module, input_ids, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate ``input_ids`` (``[L]``, ``[B, L]``, list or tensor) and the mask; move them to the model.

    Returns ``input_ids [B, L]`` (long) and ``attention_mask [B, L]`` (long) or ``None``.
    Raises :class:`EmptyInputError` for an empty input or a row with no real token.
    """
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [L] or [B, L], got shape {tuple(ids.shape)}")
    if ids.numel() == 0 or ids.shape[1] == 0:
        raise EmptyInputError("input_ids is empty: there is nothing to explain (empty text?)")
    if ids.is_floating_point():
        raise TypeError("input_ids must hold integer token ids")
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


def select_layers(model: nn.Module, layers: int | Sequence[int] | None) -> list[tuple[str, nn.Module, Architecture]]:
    """The supported token-mixing layers of ``model``, restricted to the indices ``layers`` (negatives count from the end)."""
    found = find_layers(model)
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} contains no token-mixing layer implicit_attention can decompose. "
            f"Supported model classes: {', '.join(supported_model_classes())}.")
    if layers is None:
        return found
    if isinstance(layers, int):
        layers = [layers]
    chosen = []
    for index in layers:
        if not -len(found) <= index < len(found):
            raise IndexError(f"layer index {index} out of range: the model has {len(found)} token-mixing layers")
        chosen.append(index % len(found))
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers lists a layer twice: {list(layers)}")
    return [found[i] for i in sorted(chosen)]


def layer_indices(model: nn.Module, selected) -> list[int]:
    """Position of each selected layer among all of the model's token-mixing layers.

    ``selected`` holds ``(name, module, architecture)`` triples or :class:`CapturedLayer` records;
    every call of a module run several times (``name#2``, ...) gets that module's index, so that
    ``layers=[index]`` selects it again.
    """
    names = [name for name, _, _ in find_layers(model)]
    return [names.index(base_name(item.name if isinstance(item, CapturedLayer) else item[0])) for item in selected]


def base_name(name: str) -> str:
    """``"model.layers.5.self_attn#2"`` -> ``"model.layers.5.self_attn"`` (the module of a repeated call)."""
    return name.split("#", 1)[0]


def _first_tensor(args, kwargs, key: str) -> torch.Tensor:
    return args[0] if args else kwargs[key]


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


def call_model(model: nn.Module, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
               inputs_embeds: torch.Tensor | None = None):
    """Run ``model`` on ids (or embeddings) and the mask, without a cache where the model has one."""
    kwargs = {"attention_mask": attention_mask}
    if inputs_embeds is not None:
        kwargs["inputs_embeds"] = inputs_embeds
    else:
        kwargs["input_ids"] = input_ids
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    return model(**kwargs)


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

    @property
    def is_image(self) -> bool:
        return self.name == "pixel_values"

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
    found = find_layers(model)
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} contains no token-mixing layer implicit_attention can decompose. "
            f"Supported model classes: {', '.join(supported_model_classes())}.")
    first, embedding = found[0][1], model.get_input_embeddings()
    sample = pixel_values[:1]
    with torch.no_grad():
        patches = embedding(sample)
        seen = []
        for seed in (0, 1):
            fake = torch.randn(patches.shape, generator=torch.Generator().manual_seed(seed),
                               dtype=torch.float64).to(patches)

            def stop(module, args, kwargs):
                raise _StopForward(_first_tensor(args, kwargs, "hidden_states"))

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


@contextmanager
def capture(model: nn.Module, targets: list[tuple[str, nn.Module, Architecture]], *,
            keep_graph: bool = False, block_inputs: bool = False) -> Iterator[list[CapturedLayer]]:
    """Hooks recording each target layer's input, padding mask and pre-projection output.

    With ``keep_graph`` the outputs (and block inputs) stay attached to autograd so that
    gradients with respect to them can be taken. Hooks are removed on exit, also on error.

    A module called ``k`` times in one forward (a shared block, as in Zamba) yields ``k`` records
    named ``name``, ``name#2``, ..., each with its own inputs and outputs. The yielded list is
    kept in call order while the forward runs; records of layers that did not run stay at its end.
    """
    records = [CapturedLayer(name=name, module=module, architecture=arch) for name, module, arch in targets]
    handles = []
    called = [0]  # how many calls have started: records[:called] are in call order

    def place(record):
        """Move ``record`` to the next call-order slot of ``records``."""
        position = next(i for i, r in enumerate(records) if r is record)
        records.insert(called[0], records.pop(position))
        called[0] += 1

    def on_layer(record, calls, pending):
        def hook(module, args, kwargs):
            if record.inputs is not None:
                # repeated call: freeze the previous call in a copy; the hooked record starts afresh
                finished = dataclasses.replace(record)
                records[next(i for i, r in enumerate(records) if r is record)] = finished
                records.insert(called[0], record)
                calls[0] += 1
                record.name = f"{base_name(record.name)}#{calls[0]}"
                record.output = record.module_output = record.attention_mask = None
                record.kwargs, record.extra = {}, {}
            record.block_input = pending.pop("block_input", None)
            if calls[0] == 1:
                place(record)
            else:
                called[0] += 1
            record.inputs = _first_tensor(args, kwargs, "hidden_states").detach()
            record.kwargs = {k: _detached(v) for k, v in kwargs.items()}
            mask = kwargs.get("attention_mask")
            record.attention_mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return hook

    def on_layer_output(record):
        def hook(module, args, kwargs, output):
            record.module_output = _detached(output)
            if record.architecture.output_module is None:
                first = output[0] if isinstance(output, (tuple, list)) else output
                record.output = first if keep_graph else first.detach()
        return hook

    def on_output(record):
        def hook(module, args):
            record.output = args[0] if keep_graph else args[0].detach()
        return hook

    def on_block(pending):
        # the block runs before the layer inside it: keep the tensor until the layer's call starts
        def hook(module, args, kwargs):
            tensor = _first_tensor(args, kwargs, "hidden_states")
            pending["block_input"] = tensor if keep_graph else tensor.detach()
        return hook

    try:
        for record in records:
            arch = record.architecture
            calls, pending = [1], {}
            handles.append(record.module.register_forward_pre_hook(on_layer(record, calls, pending), with_kwargs=True))
            handles.append(record.module.register_forward_hook(on_layer_output(record), with_kwargs=True))
            if arch.output_module is not None:
                output_module = record.module.get_submodule(arch.output_module)
                handles.append(output_module.register_forward_pre_hook(on_output(record)))
            if arch.extra_hooks is not None:
                handles.extend(arch.extra_hooks(record.module, record))
            if block_inputs:
                parent = arch.block_input(model, record.name) if arch.block_input is not None \
                    else model.get_submodule(record.name.rpartition(".")[0])
                handles.append(parent.register_forward_pre_hook(on_block(pending), with_kwargs=True))
        yield records
    finally:
        for handle in handles:
            handle.remove()
