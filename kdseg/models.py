"""Model factory (any smp architecture, DeepLabV3+ by default) and hook-based feature taps.

The distillation losses read activations at module paths given in the config (METHOD.md
"taps"), or at a role every smp model has (``decoder``: what the segmentation head receives;
``encoder``: the deepest encoder feature); :class:`FeatureTaps` captures them with hooks, so
smp's model code stays untouched.
"""
from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from kdseg.errors import ConfigError, one_line

DEFAULT_ARCH = "DeepLabV3Plus"
"""The architecture of a model config (or checkpoint) that names none: kdseg's only one before ``arch``."""
DILATED_ARCHS = ("DeepLabV3Plus", "DeepLabV3")
"""The architectures whose encoder is dilated to ``output_stride`` (8 or 16); the others take none."""
DECODER, ENCODER = "decoder", "encoder"
"""Tap roles: the feature map the segmentation head receives (a forward pre-hook on
``segmentation_head``) and the deepest encoder feature (the last of the encoder's outputs)."""
ROLES = (DECODER, ENCODER)
BUILT_ARGS = ("encoder_name", "encoder_weights", "classes", "encoder_output_stride", "in_channels")
"""smp arguments kdseg sets itself (from the model config's own keys), so not ``options``."""
CLOSE_MATCHES = 5
"""How many close matches an unknown encoder or module path error suggests."""
INPUT_MULTIPLE = 16
"""Every side of a DeepLabV3+ input must be a multiple of this: the encoder's output stride (16),
or 8 followed by the decoder's x4 upsampling that must land on the stride-4 features. Crops,
eval sizes, sliding windows and padded val batches are all multiples of it."""


def encoder_names() -> list[str]:
    """Names of every encoder smp can build."""
    return sorted(smp.encoders.get_encoder_names())


def check_encoder(name: str, key: str | None = None) -> None:
    """Raise a :class:`ConfigError` unless smp can build encoder ``name``; it lists close matches
    and every valid name. ``key`` names the config key (``student.encoder_name``) it came from."""
    valid = encoder_names()
    if name in valid:
        return
    close = ", ".join(difflib.get_close_matches(str(name), valid, n=CLOSE_MATCHES))
    names = f"Valid smp encoders: {', '.join(valid)}"
    if key is not None:
        hint = f"; did you mean {close}?" if close else ""
        raise ConfigError(f"config {key}={name!r}: unknown encoder{hint} {names}")
    hint = f" Did you mean {close}?" if close else ""
    raise ConfigError(f"unknown encoder_name '{name}'.{hint} {names}")


def arch_names() -> list[str]:
    """smp's architecture names (``DeepLabV3Plus``, ``PSPNet``, ``Segformer``, ...)."""
    return sorted(cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values())


def arch_class(arch: str, key: str = "arch") -> type[nn.Module]:
    """The smp model class named ``arch``, or a :class:`ConfigError` listing close matches and every name."""
    classes = {cls.__name__: cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}
    if arch in classes:
        return classes[arch]
    close = difflib.get_close_matches(str(arch), list(classes), n=CLOSE_MATCHES, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"config {key}={arch!r}: unknown smp architecture{hint} Valid: {', '.join(arch_names())}")


def check_arch_options(arch: str, options: Mapping[str, Any], output_stride: int | None, key: str = "model") -> None:
    """Raise a :class:`ConfigError` unless ``arch`` exists, takes every key of ``options`` and
    ``output_stride`` is set exactly for the dilated architectures (:data:`DILATED_ARCHS`)."""
    params = set(inspect.signature(arch_class(arch, f"{key}.arch")).parameters) - set(BUILT_ARGS)
    for name in options:
        if name not in params:
            close = difflib.get_close_matches(str(name), sorted(params), n=CLOSE_MATCHES, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"config {key}.options.{name}: {arch} has no option {name!r}{hint} Valid: {', '.join(sorted(params))}")
    if arch in DILATED_ARCHS and output_stride is None:
        raise ConfigError(f"config {key}.output_stride=None: expected 8 or 16 ({arch} dilates its encoder to it)")
    if arch not in DILATED_ARCHS and output_stride is not None:
        raise ConfigError(f"config {key}.output_stride={output_stride!r}: expected null ({arch} has no output stride; "
                          f"only {', '.join(DILATED_ARCHS)} do)")


def arch_multiple(arch: str = DEFAULT_ARCH, output_stride: int | None = 16, options: Mapping[str, Any] | None = None) -> int:
    """What both sides of an input to this architecture must be divisible by, from its config alone:
    the encoder's output stride (``2 ** encoder_depth``, capped by ``output_stride`` when dilated), and
    for DeepLabV3+ also :data:`INPUT_MULTIPLE` (its decoder's x4 upsampling lands on the stride-4 features)."""
    default = inspect.signature(arch_class(arch)).parameters.get("encoder_depth")
    stride = 2 ** int(dict(options or {}).get("encoder_depth", default.default if default is not None else 5))
    if arch in DILATED_ARCHS:
        stride = min(stride, int(output_stride))
    return math.lcm(stride, INPUT_MULTIPLE) if arch == DEFAULT_ARCH else stride


def model_name(node: Mapping[str, Any]) -> str:
    """A model config's short name for run and file names: the encoder (``resnet18``) for a DeepLabV3+,
    else the architecture and the encoder (``pspnet-resnet18``)."""
    arch = node.get("arch", DEFAULT_ARCH)
    return node["encoder_name"] if arch == DEFAULT_ARCH else f"{arch.lower()}-{node['encoder_name']}"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrapper."""
    for attribute in ("module", "_orig_mod"):
        inner = getattr(model, attribute, None)
        if isinstance(inner, nn.Module):
            return unwrap(inner)
    return model


def input_multiple(model: nn.Module) -> int:
    """The number both sides of an input to ``model`` must be divisible by: the encoder's output
    stride for smp models (which check it themselves; :data:`INPUT_MULTIPLE` at least for DeepLabV3+,
    see :func:`arch_multiple`), else 1."""
    model = unwrap(model)
    if not getattr(model, "requires_divisible_input_shape", False):
        return 1
    stride = int(getattr(getattr(model, "encoder", None), "output_stride", 1))
    return math.lcm(stride, INPUT_MULTIPLE) if isinstance(model, smp.DeepLabV3Plus) else stride


def zero_init_residual_(model: nn.Module) -> int:
    """Zero the last BN scale of every ResNet residual block (Goyal et al., 2017); returns how many.

    Each block then starts as the identity, so a deep ResNet trained from scratch learns
    about as early as a shallow one (measured here: ResNet-101 from scratch reaches twice
    the mIoU after 1,200 iterations on the built-in set).
    """
    count = 0
    for module in model.modules():
        last_bn = module.bn3 if isinstance(module, Bottleneck) else module.bn2 if isinstance(module, BasicBlock) else None
        if last_bn is not None:
            nn.init.zeros_(last_bn.weight)
            count += 1
    return count


def build_model(
    encoder_name: str,
    classes: int,
    encoder_weights: str | None = None,
    output_stride: int | None = 16,
    zero_init_residual: bool = False,
    arch: str = DEFAULT_ARCH,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """An smp model ``arch`` (DeepLabV3+ by default) with the given encoder, built by smp's factory;
    clear errors for bad names, options or offline weights.

    ``output_stride`` is the dilated encoder's stride of DeepLabV3+ and DeepLabV3 (``null`` for the
    other architectures); ``options`` are passed through to the smp class (``encoder_depth``,
    ``decoder_channels``, ``psp_out_channels``, ...). ``zero_init_residual`` applies
    :func:`zero_init_residual_` to a randomly initialised ResNet encoder (it is ignored with
    pretrained weights and for other encoders). Its arguments may come from a checkpoint file
    rather than a validated config, so it checks them itself.
    """
    options = dict(options or {})
    check_encoder(encoder_name)
    check_arch_options(arch, options, output_stride)
    if classes < 1:
        raise ConfigError(f"classes must be >= 1, got {classes}")
    stride = {"encoder_output_stride": output_stride} if arch in DILATED_ARCHS else {}
    try:
        model = smp.create_model(
            arch, encoder_name=encoder_name, encoder_weights=encoder_weights, classes=classes, **stride, **options,
        )
    except (OSError, ConnectionError, RuntimeError) as err:
        if encoder_weights is None:
            raise
        raise ConfigError(
            f"could not load encoder_weights='{encoder_weights}' for '{encoder_name}': {err}. "
            "The weights are downloaded on first use; without network access set "
            "encoder_weights=null (random init) or pre-populate the torch/huggingface cache."
        ) from err
    except (ValueError, TypeError, KeyError, AssertionError) as err:
        raise ConfigError(f"{arch} cannot be built with encoder {encoder_name!r} and options {options}: {one_line(err)}") from None
    if zero_init_residual and encoder_weights is None:
        zero_init_residual_(model.encoder)
    return model


def load_pretrained(source: str, classes: int | None = None) -> nn.Module:
    """A model saved by smp's ``save_pretrained``: a local folder, or a Hugging Face hub id (downloaded
    once into the hub cache). Offline, an id that is not cached is one :class:`ConfigError` line, and
    so is a model whose class count is not ``classes``."""
    try:
        model = smp.from_pretrained(source)
    except Exception as err:  # huggingface_hub raises its own errors (offline, unknown repo, missing file)
        where = "local folder" if Path(source).exists() else "Hugging Face hub id (is the hub reachable? offline, only cached ids load)"
        raise ConfigError(f"config teacher.pretrained={source!r}: could not load it as a {where}: {one_line(err)}") from None
    got = model.segmentation_head[0].out_channels if isinstance(getattr(model, "segmentation_head", None), nn.Sequential) else None
    if classes is not None and got is not None and got != classes:
        raise ConfigError(f"config teacher.pretrained={source!r}: the model predicts {got} classes, the dataset has {classes}")
    return model


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that lists close matches."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=CLOSE_MATCHES, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(f"tap module path '{path}' not found in {type(model).__name__}{hint}") from None


def _disable_inplace_after(model: nn.Module, path: str) -> None:
    """Switch off ``inplace`` on activations that follow ``path`` inside its parent container.

    An in-place ReLU right after the tapped BatchNorm would overwrite the captured
    pre-ReLU tensor.
    """
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    seen = False
    for name, module in parent.named_children():
        if seen and getattr(module, "inplace", False):
            module.inplace = False
        seen = seen or name == child


DEEPLABV3PLUS_TAP_ROLES = {
    "decoder.block2.1": DECODER, "decoder.block2": DECODER, "decoder.aspp": DECODER, "decoder.aspp.0.project.1": ENCODER,
}
"""The DeepLabV3+ module paths of the default taps and the role each falls back to in a pair where a
network lacks the path: the decoder's last conv (pre-ReLU, or its output) is the head's input, and
so is the ASPP's output (``cirkd``'s tap: what a DeepLabV3 or PSPNet head receives); the ASPP projection (the end of DeepLab's "encoder") is the deepest encoder feature."""


def tap_exists(model: nn.Module, key: str) -> bool:
    """Whether ``key`` (a role or a module path) can be tapped in ``model``."""
    if key in ROLES:
        return isinstance(getattr(model, "segmentation_head" if key == DECODER else "encoder", None), nn.Module)
    try:
        model.get_submodule(key)
    except AttributeError:
        return False
    return True


def resolve_taps(student: nn.Module, teacher: nn.Module, tap: str | Mapping[str, str], logits: str = "logits") -> tuple[str, str]:
    """``(student key, teacher key)`` a term's ``tap`` reads in this pair of networks.

    ``logits`` and the roles (:data:`ROLES`) read the same on both sides; a per-side mapping
    ``{student: ..., teacher: ...}`` reads each in its own network. A module path reads itself where
    both networks have it (so DeepLabV3+ pairs keep their exact pre-ReLU taps); where one lacks it, a
    default DeepLabV3+ path falls back to its role on both sides (:data:`DEEPLABV3PLUS_TAP_ROLES`); any
    other missing path is a :class:`ConfigError` with close matches.
    """
    if isinstance(tap, Mapping):
        keys = (tap["student"], tap["teacher"])
    elif tap == logits or tap in ROLES:
        keys = (tap, tap)
    elif tap_exists(student, tap) and tap_exists(teacher, tap):
        keys = (tap, tap)
    elif tap in DEEPLABV3PLUS_TAP_ROLES:
        keys = (DEEPLABV3PLUS_TAP_ROLES[tap],) * 2
    else:
        keys = (tap, tap)
    for model, key in zip((student, teacher), keys):
        if key != logits and not tap_exists(model, key):
            resolve_module(model, key)  # raises, naming close matches
    return keys


class FeatureTaps:
    """Capture features at named submodules or roles during each forward pass.

    ``taps[key]`` is the tensor captured in the latest forward: the output of the module at path
    ``key``, or for a role the segmentation head's input (``decoder``) or the encoder's last
    output (``encoder``); a role takes precedence over a module of the same path. In-place
    activations after a tapped module are switched off, and reading a tensor that was modified
    in place after capture raises instead of returning post-ReLU values.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str]) -> None:
        self.paths = sorted(set(paths))
        self._features: dict[str, torch.Tensor] = {}
        self._versions: dict[str, int] = {}
        self._handles = []
        for path in self.paths:
            if path == DECODER:
                self._handles.append(resolve_module(model, "segmentation_head").register_forward_pre_hook(self._pre_hook(path)))
            elif path == ENCODER:
                self._handles.append(resolve_module(model, "encoder").register_forward_hook(self._hook(path, last=True)))
            else:
                module = resolve_module(model, path)
                _disable_inplace_after(model, path)
                self._handles.append(module.register_forward_hook(self._hook(path)))

    def _capture(self, path: str, output: torch.Tensor) -> None:
        self._features[path] = output
        # inference-mode tensors have no version counter (and cannot be checked)
        self._versions[path] = None if output.is_inference() else output._version

    def _hook(self, path: str, last: bool = False):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self._capture(path, output[-1] if last else output)

        return hook

    def _pre_hook(self, path: str):
        def hook(_module: nn.Module, inputs: tuple) -> None:
            self._capture(path, inputs[0])

        return hook

    def __getitem__(self, path: str) -> torch.Tensor:
        if path not in self._features:
            raise KeyError(f"no feature captured at '{path}' (taps: {self.paths}); run a forward pass first")
        feature = self._features[path]
        if self._versions[path] is not None and feature._version != self._versions[path]:
            raise RuntimeError(f"the feature tapped at '{path}' was modified in place after capture")
        return feature

    def clear(self) -> None:
        self._features.clear()
        self._versions.clear()

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()
