"""The paper's CIFAR networks registered with timm, and other timm models as graph nodes."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

import timm_dcl.models as dcl_models
from timm_dcl.graph import Graph, Node
from timm_dcl.models import CIFAR_MODELS, CifarResNet, WideResNet

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _params_m(model: nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 3)


def _x(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_all_names_registered_and_listed():
    assert set(CIFAR_MODELS) == {
        "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "wrn16_2", "wrn28_2", "wrn28_10", "wrn40_2",
    }
    for name in CIFAR_MODELS:
        assert timm.is_model(name), name
        assert name in timm.list_models(), name
    assert set(timm.list_models(module="cifar_resnet")) == {n for n in CIFAR_MODELS if n.startswith("resnet")}
    assert set(timm.list_models(module="wide_resnet")) == {n for n in CIFAR_MODELS if n.startswith("wrn")}


@pytest.mark.parametrize("name", [n for n in CIFAR_MODELS if n not in ("resnet110", "wrn28_10")])
def test_create_every_model_and_forward(name):
    model = timm.create_model(name)
    assert isinstance(model, (CifarResNet, WideResNet))
    assert model.num_classes == 100
    model.eval()
    with torch.no_grad():
        assert model(_x()).shape == (2, 100)


@pytest.mark.parametrize("name,expected", [("resnet32", 0.470), ("resnet110", 1.734), ("wrn28_2", 1.479)])
def test_parameter_counts_of_the_paper(name, expected):
    assert _params_m(timm.create_model(name, num_classes=100)) == expected


def test_depth_gives_blocks_per_stage():
    for name, depth in [("resnet20", 20), ("resnet32", 32), ("resnet56", 56)]:
        model = timm.create_model(name)
        n = (depth - 2) // 6
        assert [len(stage) for stage in model.stages] == [n, n, n]
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) + 1 == depth  # + the classifier; option-A shortcuts have no conv
    wrn = timm.create_model("wrn40_2")
    assert [len(stage) for stage in wrn.stages] == [6, 6, 6]
    assert [stage[-1].conv2.out_channels for stage in wrn.stages] == [32, 64, 128]


def test_resnet110_forward_and_deep_shapes():
    model = timm.create_model("resnet110", num_classes=10).eval()
    with torch.no_grad():
        assert model(_x(2)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet20", "wrn16_2"])
@pytest.mark.parametrize("size", [32, 64, 33])
def test_any_input_resolution(name, size):
    model = timm.create_model(name, num_classes=200).eval()
    with torch.no_grad():
        feats = model.forward_features(_x(2, size))
        out = model.forward_head(feats)
    assert feats.shape[-1] == (size + 3) // 4  # two stride-2 stages, ceil each time
    assert out.shape == (2, 200)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet20", "wrn16_2"])
def test_head_interface(name):
    model = timm.create_model(name, num_classes=10).eval()
    x = _x()
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
        assert pre.shape == (2, model.num_features)
        torch.testing.assert_close(model.get_classifier()(pre), logits)
        torch.testing.assert_close(model(x), logits)
    assert model.get_classifier(name_only=True) == "fc"
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.get_classifier().out_features == 7
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)
    model.reset_classifier(5, global_pool="max")
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.amax(dim=(2, 3)))


@pytest.mark.parametrize("name", ["resnet20", "wrn16_2"])
def test_pretrained_cfg(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert cfg["mean"] == CIFAR100_MEAN and cfg["std"] == CIFAR100_STD
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 100
    assert cfg["crop_pct"] == 1.0 and cfg["first_conv"] == "conv1" and cfg["classifier"] == "fc"
    assert not cfg.get("url") and not cfg.get("hf_hub_id")
    assert model.default_cfg is model.pretrained_cfg
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == (3, 32, 32) and data_cfg["mean"] == CIFAR100_MEAN
    # the named first conv / classifier exist (timm uses them to adapt checkpoints)
    assert isinstance(model.get_submodule(cfg["first_conv"]), nn.Conv2d)
    assert isinstance(model.get_submodule(cfg["classifier"]), nn.Linear)


def test_no_pretrained_weights_to_fetch():
    with pytest.raises(RuntimeError, match="pretrained"):
        timm.create_model("resnet32", pretrained=True)


def test_in_chans_and_bad_depth():
    model = timm.create_model("resnet20", in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth=33)
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(depth=27)
    with pytest.raises(ValueError, match="widen_factor"):
        WideResNet(depth=16, widen_factor=0)


def test_option_a_shortcut_is_parameter_free_zero_padding():
    model = timm.create_model("resnet20")
    block = model.stages[1][0]
    assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    x = torch.randn(2, 16, 8, 8)
    y = block.shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


def test_wrn_projection_shortcut_and_dropout():
    model = timm.create_model("wrn16_2", drop_rate=0.3)
    first = model.stages[0][0]
    assert isinstance(first.shortcut, nn.Conv2d) and first.shortcut.kernel_size == (1, 1)
    assert model.stages[0][1].shortcut is None
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 6 and all(d.p == 0.3 for d in drops)
    assert not any(isinstance(m, nn.Dropout) for m in timm.create_model("wrn16_2").modules())
    x = _x(4)
    model.train()
    torch.manual_seed(0)
    a = model(x)
    b = model(x)
    assert not torch.allclose(a, b)  # dropout is active in training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))


def test_kaiming_init():
    model = timm.create_model("resnet56")
    conv = model.stages[2][3].conv1  # 64 -> 64, 3×3: fan_out = 576
    assert conv.weight.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.05)
    assert torch.all(model.fc.bias == 0)
    block = model.stages[0][0]
    assert torch.all(block.bn1.weight == 1) and torch.all(block.bn1.bias == 0)
    # Each residual branch starts at zero (the default), so every block starts as its shortcut.
    assert torch.all(block.bn2.weight == 0) and torch.all(block.bn2.bias == 0)
    plain = timm.create_model("resnet56", zero_init_last=False).stages[0][0].bn2
    assert torch.all(plain.weight == 1) and torch.all(plain.bias == 0)


def _loss_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    # a loss whose gradient differs per logit, so every parameter gets a non-trivial gradient
    (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
    return out.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["resnet20", "wrn16_2"])
def test_channels_last_matches_contiguous(name):
    model = timm.create_model(name, num_classes=10).eval()
    x = _x()
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.to(memory_format=torch.channels_last))
        feats = model_cl.forward_features(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert feats.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["resnet20", "wrn16_2"])
def test_grad_checkpointing_recomputes_and_matches_eager(name):
    """With checkpointing on, every block runs again in the backward pass, and the output and
    every gradient equal those of the plain model (train mode: BatchNorm on batch statistics)."""
    import copy

    eager = timm.create_model(name, num_classes=10, zero_init_last=False) if name.startswith("resnet") \
        else timm.create_model(name, num_classes=10)
    eager.train()
    ckpt = copy.deepcopy(eager)
    ckpt.set_grad_checkpointing(True)
    x = _x(4)
    out_ref, grads_ref = _loss_and_grads(eager, x)
    calls, block = [], ckpt.stages[1][0]
    block_forward = block.forward

    def counted(*args):  # not a forward hook: checkpoint's recomputation does not run those
        calls.append(1)
        return block_forward(*args)

    block.forward = counted
    out, grads = _loss_and_grads(ckpt, x)
    assert len(calls) == 2  # once in the forward pass, once recomputed for the backward
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for k in grads_ref:
        assert grads_ref[k].abs().sum() > 0, k
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", ["resnet20", "wrn16_2"])
def test_torch_compile_full_graph_matches_eager(name):
    # aot_eager traces forward and backward through dynamo/AOTAutograd without a C++ build:
    # fullgraph=True fails on any graph break
    import copy

    eager = timm.create_model(name, num_classes=10).train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = _x(4)
    out_ref, grads_ref = _loss_and_grads(eager, x)
    out, grads = _loss_and_grads(compiled, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    for k in grads_ref:
        torch.testing.assert_close(grads[k.replace("_orig_mod.", "")] if k in grads else grads["_orig_mod." + k],
                                   grads_ref[k], rtol=1e-4, atol=1e-6, msg=k)
    # the running statistics moved as in eager training
    for (k, a), b in zip(eager.named_buffers(), model.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", ["resnet20", "wrn16_2"])
def test_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        feats = model(_x())
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert [32 // f.shape[-1] for f in feats] == model.feature_info.reduction()
    full = timm.create_model(name).eval()
    with torch.no_grad():
        final, inter = full.forward_intermediates(_x())
    assert len(inter) == 4 and final.shape == full.forward_features(_x()).shape


def test_timm_and_vit_models_as_graph_nodes():
    graph = Graph(
        [Node("resnet32"), Node("resnet18"), Node("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4})],
        [["through"] * 3] * 3,
    )
    graph.check_models()
    x = _x()
    for node in graph.nodes:
        # pretrained=False: nothing is fetched, so this works offline
        model = timm.create_model(node.model, pretrained=False, num_classes=100, **node.model_kwargs).eval()
        with torch.no_grad():
            assert model(x).shape == (2, 100), node.model


def test_module_exports():
    assert dcl_models.CIFAR100_MEAN == CIFAR100_MEAN and dcl_models.CIFAR100_STD == CIFAR100_STD
