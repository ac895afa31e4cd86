"""LP's logistic regression (torch loss, scipy L-BFGS-B) solves scikit-learn's problem; LP never changes the backbone."""
import numpy as np
import pytest
import torch

import common
import lp

sklearn = pytest.importorskip("sklearn.linear_model")


def gaussian_features(n, d=32, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g) * 0.6
    y = torch.arange(n) % k
    x = means[y] + torch.randn(n, d, generator=g)
    return x, y


@pytest.mark.parametrize("c", [1e-3, 0.05, 1.0])
def test_matches_sklearn(c):
    x, y = gaussian_features(1500)
    xt, yt = gaussian_features(1500, seed=1)
    mean, std = lp.standardize(x)
    x, xt = (x - mean) / std, (xt - mean) / std
    x64, y64 = x.double(), y
    w, b = lp.fit_logreg(x, y, 10, c, max_iter=500)  # float32, as lp.py runs it
    w, b = w.double(), b.double()
    ref = sklearn.LogisticRegression(C=c, max_iter=10_000, tol=1e-10).fit(x64.numpy(), y.numpy())
    w_sk, b_sk = torch.from_numpy(ref.coef_).double(), torch.from_numpy(ref.intercept_).double()
    ours, theirs = lp.logreg_objective(x64, y64, w, b, c).item(), lp.logreg_objective(x64, y64, w_sk, b_sk, c).item()
    assert abs(ours - theirs) / theirs < 1e-3, (ours, theirs)
    acc_ours = ((xt.double() @ w.T + b).argmax(1) == yt).double().mean().item() * 100
    acc_sk = ref.score(xt.numpy(), yt.numpy()) * 100
    assert abs(acc_ours - acc_sk) <= 0.5, (acc_ours, acc_sk)


def test_warm_started_sweep_reaches_the_cold_solution():
    """Warm starting is a speed-up only: the fit at the end of a sweep equals a fit from zero."""
    x, y = gaussian_features(600)
    x = x.double()
    init = None
    for c in np.logspace(-4, 0, 6):
        init = lp.fit_logreg(x, y, 10, float(c), init, max_iter=500)
    cold = lp.fit_logreg(x, y, 10, 1.0, None, max_iter=500)
    assert lp.logreg_objective(x, y, *init, 1.0).item() == pytest.approx(lp.logreg_objective(x, y, *cold, 1.0).item(), rel=1e-5)


def test_lp_leaves_backbone_bit_identical(monkeypatch, tmp_path):
    backbone = common.load_backbone("embedded-clip-tiny")
    before = {k: v.clone() for k, v in backbone.encoder.state_dict().items()}
    monkeypatch.setattr(common, "load_backbone", lambda *a, **k: backbone)
    best = lp.main(lp.Args(dataset="embedded-tiny", out=str(tmp_path), num_c=5))
    after = backbone.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(v == 0 for k, v in best["metrics"].items() if k.startswith("distortion/"))


def test_stops_where_scikit_learn_stops():
    """The LP-FT code's fits (scikit-learn defaults: tol 1e-4, max_iter 200) end short of the optimum at weak
    regularisation; ours is the same solver with the same stopping rule, so it ends at the same point."""
    x, y = gaussian_features(1500, d=64)
    x = (x - x.mean()) / x.std()
    for c in (1e-2, 1.0, 100.0):
        w, b = lp.fit_logreg(x, y, 10, c)
        ref = sklearn.LogisticRegression(C=c).fit(x.numpy(), y.numpy())
        ours = lp.logreg_objective(x.double(), y, w.double(), b.double(), c).item()
        theirs = lp.logreg_objective(x.double(), y, torch.from_numpy(ref.coef_).double(),
                                     torch.from_numpy(ref.intercept_).double(), c).item()
        assert ours == pytest.approx(theirs, rel=1e-4), c


def test_the_solver_never_waits_on_a_tensor_turned_into_a_number():
    """On a GPU each tensor-to-number conversion makes the host wait; torch.optim.LBFGS made ~30 per iteration."""
    x, y = gaussian_features(500)
    with torch.profiler.profile() as prof:
        lp.fit_logreg(x, y, 10, 1.0)
    assert "aten::_local_scalar_dense" not in {e.key for e in prof.key_averages()}
