"""``lerpfast reproduce im --model nin``: the small batch-norm convnet of issue 13 (NIN narrowed with ``width``).

The full run (REPRODUCTIONS.md, 8 min 17 s on one thread) is too long for CI; these tests check the pieces it
adds: NIN's channel multiplier, the setting and the training options ``--model nin`` implies (one short training
through the module's own config), and the clear error for a model the module cannot train.
"""

from __future__ import annotations

import pytest
import torch

from lerpfast.reproduce import Context, Settings, im, reproduce
from lerpfast.train import models


def _convs(m):
    return [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]


@pytest.mark.parametrize(("width", "expect"), [(1.0, [192, 160, 96, 192, 192, 192, 192, 192, 10]),
                                               (0.25, [48, 40, 24, 48, 48, 48, 48, 48, 10]),
                                               (0.1, [19, 16, 10, 19, 19, 19, 19, 19, 10])])
def test_nin_width_scales_every_conv_but_the_last(width, expect):
    m = models.create("nin", num_classes=10, in_shape=(1, 8, 8), bn=True, dropout=0.3, width=width)
    assert [c.out_channels for c in _convs(m)] == expect
    assert [c.in_channels for c in _convs(m)] == [1, *expect[:-1]]
    bns = [x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)]
    assert [b.num_features for b in bns] == expect[:-1]
    m.eval()
    assert m(torch.randn(5, 1, 8, 8)).shape == (5, 10)


def test_nin_default_width_keeps_the_state_dict():
    """width=1 is the original NIN: the same names and shapes as without the option, for old checkpoints."""
    torch.manual_seed(0)
    a = models.create("nin", num_classes=10, bn=True).state_dict()
    torch.manual_seed(0)
    b = models.create("nin", num_classes=10, bn=True, width=1.0).state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad", [0, -0.5])
def test_nin_bad_width_is_an_error_naming_it(bad):
    with pytest.raises(ValueError, match="NIN width"):
        models.create("nin", num_classes=10, in_shape=(1, 8, 8), width=bad)


def _ctx(tmp_path, model, dataset="digits", quick=False):
    return Context(Settings(paper="im", out=tmp_path, dataset=dataset, model=model, quick=quick), log=lambda *a: None)


def test_model_choice_implies_the_setting(tmp_path):
    assert im._setting(_ctx(tmp_path, "nin")) is im.CONV
    assert im._setting(_ctx(tmp_path, "lenet_300_100", "fashion-mnist")) is im.FULL
    assert im._setting(_ctx(tmp_path, "nin", quick=True)) is im.QUICK
    opts = im._config(_ctx(tmp_path, "nin"), "sgd", True, im.CONV)["model_options"]
    assert opts == "bn=True,dropout=0.3,width=0.25"
    # the paper's NIN on CIFAR-10: full width
    assert im._config(_ctx(tmp_path, "nin", "cifar10"), "adam", False, im.CONV)["model_options"] == \
        "bn=False,dropout=0.3"
    # the MLP's options are unchanged (its stored runs keep their hashes)
    assert im._config(_ctx(tmp_path, "lenet_300_100"), "sgd", True, im.FULL, init="normal(-1,1)")["model_options"] \
        == "bn=True,dropout=0.3,init=normal(-1,1)"


def test_nin_trains_from_the_module_config(tmp_path):
    """A few steps of the module's own NIN config on digits: the run's model is the narrow NIN with batch norm, and
    the loss is finite; an exotic initialization reaches the convs."""
    from lerpfast.train import list_checkpoints, load_model

    ctx = _ctx(tmp_path, "nin")
    st = im._setting(ctx)
    torch.set_num_threads(1)
    for init in (None, "normal(-1,1)"):
        cfg = im._config(ctx, "sgd", True, st, init=init)
        cfg.update(steps="3it", log_every=1)
        run = ctx.train(**cfg)
        model = load_model(run)
        assert [c.out_channels for c in _convs(model)][:3] == [48, 40, 24]
        assert any(isinstance(x, torch.nn.BatchNorm2d) for x in model.modules())
        w0 = torch.load(list_checkpoints(run, 0)[0], weights_only=True)["features.0.weight"].double()
        if init is None:
            assert abs(w0.mean().item()) < 0.2
        else:
            assert abs(w0.mean().item() + 1) < 0.3 and abs(w0.std().item() - 1) < 0.3
        summary = im._summary(run)
        assert torch.isfinite(torch.tensor(summary["test_loss"]))


def test_unsupported_model_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="'vgg11'.*lenet_300_100, mlp, nin"):
        reproduce("im", quick=True, model="vgg11", out=tmp_path, progress=False, threads=1, log=lambda *a, **k: None)
