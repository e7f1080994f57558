"""Causal language models along a line: per-token next-token metrics, ignored positions, and the models themselves
(GPT-2, Llama-style: RMSNorm, rotary embeddings, SDPA attention) against a float64 per-point oracle."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lerpfast import sweep
from lerpfast.data import next_token_pairs
from lerpfast.metrics import IGNORE_INDEX

transformers = pytest.importorskip("transformers")

ALPHAS = [-0.3, 0.0, 0.5, 1.0, 1.2]
VOCAB, PAD = 37, 0


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=24, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def _tokens(n=7, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    ids[0, -3:] = PAD  # padded sequences: their last positions leave the metrics
    ids[3, -1:] = PAD
    return ids


def _moved(model, seed=2, scale=0.05):
    """Every floating tensor moved; tied tensors (GPT-2's lm_head and wte) by the same step, so they stay tied."""
    g = torch.Generator().manual_seed(seed)
    steps: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            step = steps.setdefault(v.data_ptr(), scale * torch.randn(v.shape, generator=g))
            v = v + step
        out[k] = v
    return out


def _oracle(model, theta_b, alphas, x, y):
    """Mean token cross-entropy and next-token error over the labels that are not IGNORE_INDEX, float64."""
    net = copy.deepcopy(model).double().eval()
    theta_a = model.state_dict()
    loss, err = [], []
    keep = y != IGNORE_INDEX
    with torch.no_grad():
        for a in alphas:
            net.load_state_dict({k: (torch.lerp(v.double(), theta_b[k].double(), a) if v.is_floating_point() else v)
                                 for k, v in theta_a.items()}, strict=False)
            z = net(input_ids=x).logits
            loss.append(float(F.cross_entropy(z.reshape(-1, VOCAB), y.reshape(-1), ignore_index=IGNORE_INDEX)))
            err.append(float((z.argmax(-1) != y)[keep].double().mean()))
    return np.array(loss), np.array(err)


def test_next_token_pairs():
    ids = torch.tensor([[5, 6, 7, PAD], [8, 9, 10, 11]])
    x, y = next_token_pairs(ids, pad_id=PAD)
    assert x.tolist() == [[5, 6, 7], [8, 9, 10]] and y.tolist() == [[6, 7, IGNORE_INDEX], [9, 10, 11]]
    with pytest.raises(ValueError, match=r"\(N, T\) integer tensor.*shape \(4,\)"):
        next_token_pairs(torch.arange(4))


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_causal_lm_line_matches_oracle_per_token(make):
    torch.manual_seed(0)
    model = make()
    theta_b = _moved(model)
    x, y = next_token_pairs(_tokens(), pad_id=PAD)
    want_loss, want_err = _oracle(model, theta_b, ALPHAS, x, y)
    for precision, rtol in (("fp64", 1e-9), ("fp32", 1e-5)):
        r = sweep(model, (model, theta_b), ALPHAS, (x, y), batch_size=3, precision=precision, progress=False,
                  reference=None)
        np.testing.assert_allclose(r.loss, want_loss, rtol=rtol)
        np.testing.assert_allclose(r.error, want_err, atol=1e-12 if precision == "fp64" else 1.01 / int(
            (y != IGNORE_INDEX).sum()))
        assert not [m for m, p in r.meta["paths"].items() if p.startswith("fallback")], r.meta["paths"]
    # the perplexity reading: exp(mean token cross-entropy)
    assert np.all(np.exp(r.loss) > 1) and np.all(np.exp(r.loss) < 10 * VOCAB)


def test_ignored_positions_and_bad_labels():
    torch.manual_seed(0)
    model = _gpt2()
    x, y = next_token_pairs(_tokens(), pad_id=PAD)
    y_all = y.clone()
    y_all[:3] = IGNORE_INDEX  # a whole batch of 3 sequences ignored: it adds nothing, the others still count
    r = sweep(model, (model, _moved(model)), ALPHAS, (x, y_all), batch_size=3, progress=False, precision="fp64")
    want_loss, _ = _oracle(model, _moved(model), ALPHAS, x, y_all)
    np.testing.assert_allclose(r.loss, want_loss, rtol=1e-9)
    y_bad = y.clone()
    y_bad[4, 2] = -5
    with pytest.raises(ValueError, match=r"label -5 at position .* outside \[0, 37\).*-100 marks a position"):
        sweep(model, (model, _moved(model)), ALPHAS, (x, y_bad), batch_size=3, progress=False)


@pytest.mark.parametrize("custom", [False, True])
def test_metrics_in_pieces_equal_metrics_at_once(monkeypatch, custom):
    """The float64 path taken a few points at a time (large vocabularies) gives the same sums as in one piece,
    reference metrics, top-5 and undefined (NaN / +inf) rows included."""
    from lerpfast import metrics as M

    g = torch.Generator().manual_seed(0)
    K, N, C = 5, 6, 9
    logits = torch.randn(K, N, C, generator=g)
    logits[1, 2, 3] = float("nan")
    logits[3, 0, 0] = float("inf")
    ref = torch.randn(N, C, generator=g)
    t = torch.randint(0, C, (N,), generator=g)
    t[4] = IGNORE_INDEX
    loss_fn = (lambda z, y: F.cross_entropy(z, y, reduction="none") ** 2) if custom else None

    def run():
        pm = M.PointMetrics(K, loss_fn=loss_fn)
        pm.update(logits, t, ref)
        pm.update(logits.flip(0), t, ref)
        return pm.compute()

    whole = run()
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 2 * N * C)  # two points per piece: pieces of 2, 2, 1
    pieces = run()
    assert whole.keys() == pieces.keys() == {"loss", "error", "top5_error", "distance", "disagreement"}
    for k in whole:
        np.testing.assert_array_equal(whole[k], pieces[k])
    assert np.isnan(whole["loss"][1]) and np.isnan(whole["loss"][3]) and np.isfinite(whole["loss"][0])
