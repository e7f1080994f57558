"""Model zoo: every model builds, runs on every input shape, is deterministic, and has the expected structure."""

import pytest
import torch
import torch.nn as nn

from lerpfast.train import models

SMALL = ["lenet_300_100", "mlp", "resnet20", "resnet32", "vgg11", "vgg16", "nin", "deep_linear"]


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("in_shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_forward_shapes(name, in_shape):
    torch.manual_seed(0)
    model = models.create(name, num_classes=7, in_shape=in_shape).eval()
    out = model(torch.randn(3, *in_shape))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", models.available())
def test_deterministic_given_seed(name):
    kw = {"in_shape": (3, 32, 32)} if name == "resnet50" else {}
    torch.manual_seed(123)
    a = models.create(name, **kw).state_dict()
    torch.manual_seed(123)
    b = models.create(name, **kw).state_dict()
    torch.manual_seed(124)
    c = models.create(name, **kw).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_available_lists_the_zoo():
    names = set(models.available())
    expected = {"lenet_300_100", "mlp", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg11", "vgg13",
                "vgg16", "vgg19", "nin", "resnet50", "deep_linear"}
    assert expected <= names
    with pytest.raises(ValueError, match="unknown model"):
        models.create("resnet7")


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_lenet_300_100_structure():
    m = models.create("lenet_300_100")
    assert [tuple(p.shape) for p in m.parameters()] == [(300, 784), (300,), (100, 300), (100,), (10, 100), (10,)]
    assert _nparams(m) == 266_610


def test_cifar_resnet_depths_and_options():
    # ResNet-20 with 1x1 projection shortcuts (OpenLTH's CIFAR ResNet): 272,474 parameters.
    assert _nparams(models.create("resnet20")) == 272_474
    convs = [m for m in models.create("resnet56").modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 55  # 6n + 1 3x3 convs + the fc layer = 56 weighted layers
    nobn = models.create("resnet20", bn=False, width=2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in nobn.modules())
    assert nobn.fc.in_features == 128
    assert all(m.bias is not None for m in nobn.modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(ValueError):
        models.CifarResNet(depth=21)


def test_vgg_bn_toggle_and_depth():
    m = models.create("vgg16")
    assert sum(isinstance(x, nn.Conv2d) for x in m.modules()) == 13
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 13
    m = models.create("vgg19", bn=False)
    assert sum(isinstance(x, nn.Conv2d) for x in m.modules()) == 16
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())


def test_resnet50_matches_torchvision_layout():
    m = models.create("resnet50")
    sd = m.state_dict()
    # torchvision.models.resnet50(): 25,557,032 parameters, 320 state-dict entries, these names.
    assert _nparams(m) == 25_557_032
    assert len(sd) == 320
    for k, shape in {"conv1.weight": (64, 3, 7, 7), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                     "layer2.0.conv2.weight": (128, 128, 3, 3), "layer4.2.bn3.running_var": (2048,),
                     "layer3.5.bn2.num_batches_tracked": (), "fc.weight": (1000, 2048)}.items():
        assert tuple(sd[k].shape) == shape
    assert m.layer2[0].conv2.stride == (2, 2) and m.layer2[0].conv1.stride == (1, 1)  # stride on the 3x3 ("v1.5")
    m.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "maxout"])
def test_mlp_activations_and_dropout(activation):
    torch.manual_seed(0)
    m = models.create("mlp", in_shape=(1, 8, 8), widths=(32, 16), activation=activation, pieces=3, dropout=0.5)
    pieces = 3 if activation == "maxout" else 1
    assert m.hidden[0].out_features == 32 * pieces and m.hidden[1].in_features == 32
    x = torch.randn(4, 1, 8, 8)
    m.eval()
    assert torch.equal(m(x), m(x))  # dropout off in eval mode
    m.train()
    assert m(x).shape == (4, 10)


def test_maxout_is_max_over_pieces():
    torch.manual_seed(0)
    m = models.MLP(in_features=2, num_classes=1, widths=(1,), activation="maxout", pieces=2)
    with torch.no_grad():
        m.hidden[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        m.hidden[0].bias.zero_()
        m.out.weight.fill_(1.0)
        m.out.bias.zero_()
    assert m(torch.tensor([[3.0, -2.0], [-1.0, 5.0]])).flatten().tolist() == [3.0, 5.0]


def test_deep_linear_scalar_model_is_w1_w2_x():
    torch.manual_seed(0)
    m = models.create("deep_linear")  # defaults: in 1, out 1, depth 2, width 1, no bias
    w1, w2 = (layer.weight.item() for layer in m.layers)
    x = torch.tensor([[2.0], [-0.5]])
    torch.testing.assert_close(m(x), x * w1 * w2)
    deep = models.create("deep_linear", num_classes=3, in_shape=(5,), depth=4, width=8)
    assert [tuple(p.shape) for p in deep.parameters()] == [(8, 5), (8, 8), (8, 8), (3, 8)]


def test_train_defaults_follow_openlth():
    assert models.train_defaults("lenet_300_100") == {"dataset": "mnist", "batch_size": 128, "optimizer": "sgd",
                                                       "lr": 0.1, "steps": "40ep"}
    r = models.train_defaults("resnet20")
    assert (r["optimizer"], r["momentum"], r["lr"], r["milestones"], r["weight_decay"], r["steps"]) == (
        "sgdm", 0.9, 0.1, "80ep,120ep", 1e-4, "160ep")
    i = models.train_defaults("resnet50")
    assert (i["batch_size"], i["lr"], i["warmup"], i["milestones"], i["steps"]) == (1024, 0.4, "5ep", "30ep,60ep,80ep",
                                                                                   "90ep")


def test_mlp_batch_norm_option():
    # bn=True (Im et al.'s with / without batch norm): BatchNorm1d between each hidden Linear and its activation;
    # the default model is unchanged, and for one seed both share their Linear weights (the same initialization).
    torch.manual_seed(0)
    plain = models.create("lenet_300_100", in_shape=(1, 8, 8))
    torch.manual_seed(0)
    bn = models.create("lenet_300_100", in_shape=(1, 8, 8), bn=True)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain.modules())
    assert [m.num_features for m in bn.modules() if isinstance(m, nn.BatchNorm1d)] == [300, 100]
    sd_plain, sd_bn = plain.state_dict(), bn.state_dict()
    assert set(sd_bn) - set(sd_plain) == {f"norms.{i}.{k}" for i in (0, 1) for k in
                                          ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert all(torch.equal(sd_plain[k], sd_bn[k]) for k in sd_plain)
    x = torch.randn(16, 1, 8, 8)
    bn.train()
    h = bn.norms[0](bn.hidden[0](x.flatten(1)))  # training mode: batch statistics, zero mean per feature
    torch.testing.assert_close(h.mean(0), torch.zeros(300), atol=1e-5, rtol=0)
    assert bn(x).shape == (16, 10)
    bn.eval()
    assert torch.isfinite(bn(x)).all()
    m = models.create("mlp", in_shape=(1, 8, 8), widths=(8,), activation="maxout", pieces=3, bn=True)
    assert m.norms[0].num_features == 24 and m(x).shape == (16, 10)
