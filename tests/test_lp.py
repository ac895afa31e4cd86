"""LP's logistic regression (torch loss, scipy L-BFGS-B) solves scikit-learn's problem; LP never changes the backbone."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
import lp
from conftest import read_results

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


def test_features_are_standardised_with_one_scalar_mean_and_std_not_per_dimension():
    """The LP-FT code standardises with ONE mean and ONE std over the whole train-feature matrix; per-dimension
    statistics would give every feature equal weight and another regularisation path (lp.py and LP-FT's stage 1)."""
    import lpft

    x = torch.randn(200, 4) * torch.tensor([1.0, 10.0, 0.1, 3.0]) + torch.tensor([5.0, -2.0, 0.0, 1.0])
    for module in (lp, lpft):
        mean, std = module.standardize(x)
        assert isinstance(mean, float) and isinstance(std, float), module.__name__
        assert mean == pytest.approx(x.mean().item()) and std == pytest.approx(x.std().item()), module.__name__


def test_a_warm_started_fit_starts_from_the_head_it_is_given():
    """Each C's fit starts from the previous C's head (LP-FT code: warm_start): one L-BFGS iteration from the optimum
    stays there, where one from zero does not; a fit that ignored `init` would stop short on every weak C."""
    x, y = gaussian_features(600)
    x = (x - x.mean()) / x.std()
    optimum = lp.fit_logreg(x, y, 10, 1.0, max_iter=500)
    best = lp.logreg_objective(x.double(), y, *(t.double() for t in optimum), 1.0).item()
    warm = lp.fit_logreg(x, y, 10, 1.0, optimum, max_iter=1)
    cold = lp.fit_logreg(x, y, 10, 1.0, None, max_iter=1)
    assert lp.logreg_objective(x.double(), y, *(t.double() for t in warm), 1.0).item() == pytest.approx(best, rel=1e-4)
    assert lp.logreg_objective(x.double(), y, *(t.double() for t in cold), 1.0).item() > 1.1 * best


def test_lp_sweeps_the_lp_ft_codes_grid_from_strongest_regularisation_warm_starting_each_fit(monkeypatch, tmp_path):
    """C = logspace(-7, 2, 50) in increasing order (strongest regularisation first), 200 L-BFGS iterations each, each
    fit starting from the previous C's head; the run reports the C with the best ID validation accuracy."""
    calls, heads = [], []  # (c, init, max_iter) of every fit; the heads handed back
    g = torch.Generator().manual_seed(0)

    def fit(x, y, num_classes, c, init=None, max_iter=200):
        calls.append((c, init, max_iter))
        heads.append((torch.randn(num_classes, x.shape[1], generator=g), torch.zeros(num_classes)))
        return heads[-1]

    monkeypatch.setattr(lp, "fit_logreg", fit)
    best = lp.main(lp.Args(dataset="embedded-tiny", out=str(tmp_path)))
    assert [c for c, _, _ in calls] == pytest.approx(list(np.logspace(-7, 2, 50)), rel=1e-9)
    assert {m for _, _, m in calls} == {200}
    assert calls[0][1] is None and all(init is head for (_, init, _), head in zip(calls[1:], heads))
    records = read_results(tmp_path)
    assert [r["c"] for r in records] == [c for c, _, _ in calls]
    top = max(r["metrics"]["acc/id_val"] for r in records)
    assert best["c"] == next(r["c"] for r in records if r["metrics"]["acc/id_val"] == top)  # ties: the smaller C


def test_lpft_stage1_selects_c_on_id_validation_and_a_tie_keeps_the_smaller_c_as_lp_does(monkeypatch):
    """LP-FT's first stage picks its C as lp.py does: the best ID validation accuracy, ties to the earlier (smaller,
    more regularised) C; the ID test and OOD features play no part. Here every C's head predicts the same classes
    (w = c * the same matrix): all tie, so the smallest C is the one kept."""
    import lpft

    g = torch.Generator().manual_seed(0)
    direction = torch.randn(3, 4, generator=g)
    train, val = torch.randn(30, 4, generator=g), torch.randn(12, 4, generator=g)
    fits = []

    def fit(x, y, num_classes, c, init=None, max_iter=200):
        fits.append(c)
        return c * direction, torch.zeros(num_classes)

    dataset = SimpleNamespace(classnames=("a", "b", "c"), train=SimpleNamespace(labels=torch.arange(30) % 3),
                              val=SimpleNamespace(labels=torch.arange(12) % 3))
    args = SimpleNamespace(c_min=1e-2, c_max=1e2, num_c=5, max_iter=7)
    monkeypatch.setattr(lpft, "fit_logreg", fit)
    w, b, c = lpft.linear_probe(args, dataset, train, {"id_val": val, "id_test": None}, "cpu")
    assert fits == pytest.approx([1e-2, 1e-1, 1.0, 1e1, 1e2]) and c == pytest.approx(1e-2)
    mean, std = lpft.standardize(train)
    torch.testing.assert_close(w, 1e-2 * direction / std)  # the kept head, mapped back to raw features
