"""Model zoo: shapes, parameter counts, the batch-first / no-mixing contract, user factories."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from lte.common.job.models import (
    MODEL_NAMES,
    VIT_PRESETS,
    MLPConfig,
    ViT,
    ViTConfig,
    build_model,
    count_parameters,
    default_patch_size,
    trunc_normal_,
)

VIT_NAMES = [n for n in MODEL_NAMES if n.startswith("vit")]


def small(name: str, **overrides) -> nn.Module:
    return build_model(name, image_size=32, in_channels=3, num_classes=10, patch_size=8, **overrides)


# --- shapes and sizes --------------------------------------------------------------------


@pytest.mark.parametrize("name", VIT_NAMES)
def test_vit_presets_have_standard_shapes(name: str) -> None:
    # the meta device builds the full-size model without allocating or initialising it
    with torch.device("meta"):
        model = small(name)
        logits = model(torch.empty(2, 3, 32, 32))
    preset = VIT_PRESETS[name]
    assert logits.shape == (2, 10)
    assert len(model.blocks) == preset["depth"]
    assert model.blocks[0].attn.num_heads == preset["num_heads"]
    assert model.blocks[0].mlp.fc1.weight.shape == (preset["mlp_dim"], preset["width"])
    assert model.patch_embed.proj.weight.shape == (preset["width"], 3 * 8 * 8)
    assert model.pos_embed.shape == (1, 1 + 16, preset["width"])


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if not n.startswith("gpt")])  # GPTs: test_lm.py
def test_forward_returns_finite_logits(name: str) -> None:
    torch.manual_seed(0)
    # one block is enough to run the real math of the wide presets quickly
    model = small(name) if name in ("mlp", "vit-tiny") else small(name, depth=1)
    logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 10)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_mnist_sized_vit_uses_default_patch() -> None:
    model = build_model("vit-tiny", image_size=28, in_channels=1, num_classes=10, depth=1)
    assert model.config.patch_size == 4
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_vit_b_has_about_86m_parameters() -> None:
    with torch.device("meta"):
        model = build_model("vit-b", image_size=224, in_channels=3, num_classes=1000)
    n = count_parameters(model)
    assert 85_000_000 < n < 87_000_000
    assert n == 86_567_656  # the published ViT-B/16 count (timm vit_base_patch16_224)


def test_count_parameters() -> None:
    assert count_parameters(nn.Linear(3, 4)) == 16
    assert count_parameters(build_model("mlp", image_size=2, in_channels=1, num_classes=3, hidden=())) == 15


def test_default_patch_size() -> None:
    assert default_patch_size(8) == 2  # 16 tokens
    assert default_patch_size(28) == 4  # 49 tokens
    assert default_patch_size(32) == 4  # 64 tokens
    assert default_patch_size(64) == 16
    assert default_patch_size(224) == 16
    with pytest.raises(ValueError, match="not divisible by the default patch_size 16"):
        default_patch_size(100)


def test_indivisible_patch_size_is_an_error() -> None:
    with pytest.raises(ValueError, match="image_size 32 is not divisible by patch_size 5"):
        build_model("vit-tiny", image_size=32, in_channels=3, num_classes=10, patch_size=5)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ViTConfig(width=100, num_heads=3)


def test_wrong_image_shape_is_a_clear_error() -> None:
    model = small("vit-tiny", depth=1)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 32, 32\], got \[2, 3, 28, 28\]"):
        model(torch.randn(2, 3, 28, 28))


# --- structure: what LTE needs -----------------------------------------------------------


def test_patch_embedding_equals_a_strided_conv() -> None:
    torch.manual_seed(0)
    model = small("vit-tiny", depth=1)
    images = torch.randn(2, 3, 32, 32)
    proj = model.patch_embed.proj
    conv = nn.Conv2d(3, proj.out_features, kernel_size=8, stride=8)
    conv.weight.data = proj.weight.data.view(-1, 3, 8, 8)
    conv.bias.data = proj.bias.data
    expected = conv(images).flatten(2).transpose(1, 2)  # [B, L, D] in row-major patch order
    torch.testing.assert_close(model.patch_embed(images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "vit-tiny"])
def test_only_linears_norms_and_tokens(name: str) -> None:
    model = small(name, depth=2) if name != "mlp" else small(name)
    forbidden = (nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout)
    assert not any(isinstance(m, forbidden) for m in model.modules())
    # everything that is not a Linear weight becomes a replica: only biases, norms and tokens
    for n, _ in model.named_parameters():
        owner = model.get_submodule(n.rsplit(".", 1)[0]) if "." in n else model
        if not (isinstance(owner, nn.Linear) and n.endswith(".weight")):
            assert n.endswith(".bias") or "norm" in n or n in ("cls_token", "pos_embed"), n


@pytest.mark.parametrize("name", ["mlp", "vit-tiny"])
def test_every_linear_sees_batch_first(name: str) -> None:
    model = small(name, depth=2) if name != "mlp" else small(name)
    seen: list[tuple[str, int]] = []

    def hook(module_name: str):
        return lambda mod, inputs, out: seen.append((module_name, inputs[0].shape[0]))

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for n, m in linears.items():
        m.register_forward_hook(hook(n))
    model(torch.randn(5, 3, 32, 32))
    assert {n for n, _ in seen} == set(linears)
    assert all(batch == 5 for _, batch in seen), seen


@pytest.mark.parametrize("name", ["mlp", "vit-tiny"])
def test_samples_never_mix_across_the_batch(name: str) -> None:
    torch.manual_seed(0)
    model = (small(name, depth=2) if name != "mlp" else small(name)).double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    out = model(x)
    x_changed = x.clone()
    x_changed[1:] = torch.randn(3, 3, 32, 32, dtype=torch.float64) * 5
    torch.testing.assert_close(model(x_changed)[0], out[0])
    torch.testing.assert_close(model(x[:1])[0], out[0])  # alone or in a batch: same answer


def test_init_is_seeded_and_truncated() -> None:
    torch.manual_seed(1)
    a = small("vit-tiny", depth=1)
    torch.manual_seed(1)
    b = small("vit-tiny", depth=1)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert torch.equal(a.cls_token, torch.zeros_like(a.cls_token))
    fc1 = a.blocks[0].mlp.fc1
    assert torch.equal(fc1.bias, torch.zeros_like(fc1.bias))
    w = trunc_normal_(torch.empty(512, 512), std=0.02)
    assert abs(w.std().item() - 0.02) < 0.001
    assert w.abs().max().item() <= 2 * 0.02 / 0.87962566 + 1e-7


# --- overrides and names -------------------------------------------------------------------


def test_overrides_reach_the_config() -> None:
    model = small("vit-s", depth=2, mlp_dim=64)
    assert isinstance(model, ViT)
    assert len(model.blocks) == 2 and model.blocks[0].mlp.fc1.out_features == 64
    mlp = build_model("mlp", image_size=8, in_channels=1, num_classes=10, hidden=[32])
    assert mlp.config == MLPConfig(in_features=64, num_classes=10, hidden=(32,))
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [32, 10]
    linear = build_model("mlp", image_size=1, in_channels=64, num_classes=64, hidden=())
    assert [type(m) for m in linear.modules()][1:] == [nn.ModuleList, nn.Linear]
    assert build_model("MLP", image_size=8, in_channels=1, num_classes=10).config.hidden == (256, 256)
    assert small("vit_tiny", depth=1).config.width == 192


def test_unknown_names_and_options() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet'.*vit-b.*package.module:factory"):
        build_model("resnet", image_size=32, in_channels=3, num_classes=10)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['dept'\] for model 'vit-s'"):
        small("vit-s", dept=2)


# --- user factories ------------------------------------------------------------------------

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def linear(image_size, num_classes, in_channels=1):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))

    def wide(image_size, in_channels, num_classes, width=8):
        return nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * image_size**2, width), nn.Linear(width, num_classes)
        )

    def anything(**kwargs):
        model = nn.Linear(1, 1)
        model.received = kwargs
        return model

    def not_a_module(image_size):
        return "a string"

    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "lte_test_user_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "lte_test_user_models", raising=False)
    return "lte_test_user_models"


def test_user_factory_gets_the_kwargs_it_accepts(user_module: str) -> None:
    model = build_model(f"{user_module}:linear", image_size=4, in_channels=3, num_classes=5)
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 5)
    wide = build_model(f"{user_module}:wide", image_size=4, in_channels=1, num_classes=5, width=16)
    assert wide[1].out_features == 16
    anything = build_model(
        f"{user_module}:anything", image_size=4, in_channels=1, num_classes=5, patch_size=2
    )
    assert anything.received == dict(image_size=4, in_channels=1, num_classes=5, patch_size=2)


def test_user_factory_errors(user_module: str) -> None:
    kw = dict(image_size=4, in_channels=1, num_classes=5)
    with pytest.raises(ImportError, match="cannot import module 'no_such_pkg.models'.*PYTHONPATH"):
        build_model("no_such_pkg.models:make", **kw)
    with pytest.raises(AttributeError, match=f"module '{user_module}' has no attribute 'missing'"):
        build_model(f"{user_module}:missing", **kw)
    with pytest.raises(TypeError, match="is not callable"):
        build_model(f"{user_module}:NOT_CALLABLE", **kw)
    with pytest.raises(TypeError, match="returned str, expected a torch.nn.Module"):
        build_model(f"{user_module}:not_a_module", **kw)
    with pytest.raises(TypeError, match=r"does not accept option\(s\) \['depth'\]"):
        build_model(f"{user_module}:linear", depth=3, **kw)
    with pytest.raises(ValueError, match="must look like 'package.module:factory'"):
        build_model(f"{user_module}:", **kw)
