import dataclasses

import numpy as np
import pytest
import torch

from engine.capture import dynamics as dyn
from engine.scores.registry import first_iteration, forgetting_events


def test_margins_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.2, 2.0, 1.5], [1.0, 0.0, 4.0]])
    targets = torch.tensor([0, 0, 1])
    c = dyn.batch_capture(logits, targets)
    # Pleiss: z_y - max_{k != y} z_k
    assert c.margin.tolist() == pytest.approx([2.0, 0.2 - 2.0, 0.0 - 4.0])
    # Yang: z_y - second largest logit
    assert c.margin_yang.tolist() == pytest.approx([2.0, 0.2 - 1.5, 0.0 - 1.0])
    assert c.pred.tolist() == [0, 1, 2]
    assert c.other.tolist() == [1, 1, 2]
    p = torch.softmax(logits, 1)[torch.arange(3), targets]
    assert c.prob.tolist() == pytest.approx(p.tolist())
    assert c.loss.tolist() == pytest.approx((-p.log()).tolist(), rel=1e-5)
    onehot = torch.nn.functional.one_hot(targets, 3).float()
    assert c.el2n.tolist() == pytest.approx((torch.softmax(logits, 1) - onehot).norm(dim=1).tolist(), rel=1e-5)


def test_other_excludes_threshold_class():
    logits = torch.tensor([[1.0, 0.0, 5.0]])  # class 2 is the fake threshold class
    c = dyn.batch_capture(logits, torch.tensor([0]), n_real_classes=2)
    assert c.margin.item() == pytest.approx(-4.0)  # margins see the fake class (Pleiss)
    assert c.other.item() == 1  # the suggested relabel never is the fake class


def test_threshold_pass_reads_confidence_el2n_and_accuracy_over_the_real_classes():
    """In a threshold pass the c+1-way softmax gives the fake class mass; the c-way scores are renormalised."""
    logits = torch.tensor([[2.0, 1.0, 0.0, 3.0], [0.0, 1.0, 0.5, 2.0], [0.0, 0.0, 0.0, 4.0]])
    targets = torch.tensor([0, 1, 3])  # the third is a threshold sample (fake class 3)
    c = dyn.batch_capture(logits, targets, n_real_classes=3)
    real = torch.softmax(logits[:2, :3], 1)
    assert c.prob[:2].tolist() == pytest.approx(real[torch.arange(2), targets[:2]].tolist(), rel=1e-6)
    onehot = torch.nn.functional.one_hot(targets[:2], 3).float()
    assert c.el2n[:2].tolist() == pytest.approx((real - onehot).norm(dim=1).tolist(), rel=1e-5)
    assert c.pred.tolist() == [0, 1, 3]  # argmax over the real classes (the fake class leads both rows)
    full = torch.softmax(logits, 1)
    assert c.prob[2].item() == pytest.approx(full[2, 3].item(), rel=1e-6)  # a threshold sample: all outputs
    assert c.loss.tolist() == pytest.approx((-full[torch.arange(3), targets].log()).tolist(), rel=1e-5)  # as trained
    assert c.margin[0].item() == pytest.approx(2.0 - 3.0)  # margins still compete with the fake class


def test_suggested_class_is_never_the_target_or_the_fake_class():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2000, 11, generator=g)
    y = torch.randint(0, 11, (2000,), generator=g)
    c = dyn.batch_capture(z, y, n_real_classes=10)
    masked = z[:, :10].clone()
    masked[torch.arange(2000)[y < 10], y[y < 10]] = float("-inf")
    assert torch.equal(c.other, masked.argmax(1))


def _hard_logits(rows: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with exact ties (integer values), -inf entries and huge finite values among ordinary ones."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, c, generator=g) * 4
    z[: rows // 4] = torch.randint(0, 3, (rows // 4, c), generator=g).float()  # many exact ties
    q = rows // 4
    z[q : 2 * q][torch.rand(q, c, generator=g) < 0.3] = float("-inf")  # -inf logits (never a whole row)
    z[q : 2 * q, 0] = 0.0
    z[2 * q : 2 * q + 8, :3] = torch.tensor([1e30, -1e30, 5e29])[:c]  # huge finite logits
    z[2 * q + 8 : 3 * q] *= 20  # confident: most logits more than SOFTMAX_FLOOR below the top
    return z, torch.randint(0, c, (rows,), generator=g)


@pytest.mark.parametrize(("c", "n_real"), [(2, 2), (10, 10), (11, 10), (1000, 1000), (1001, 1000)])
def test_capture_steps_give_the_values_of_one_step(monkeypatch, shift, c, n_real):
    """On the CPU a large batch is captured in steps of WORKSPACE_VALUES logits: bit-identical to one step."""
    z, y = _hard_logits(203, c, seed=c)
    whole = dyn.batch_capture(z, y, n_real)
    for values in (c, 7 * c, 64 * c):  # 1, 7 and 64 rows per step
        monkeypatch.setattr(dyn, "WORKSPACE_VALUES", values)
        steps = dyn.batch_capture(z, y, n_real)
        for f in dataclasses.fields(dyn.BatchCapture):
            a, b = getattr(whole, f.name), getattr(steps, f.name)
            assert a.shape == (203,) and torch.equal(a.isnan(), b.isnan()), f.name
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), f"{f.name} with {values // c} rows per step"


@pytest.mark.parametrize(("c", "n_real"), [(10, 10), (11, 10), (1001, 1000)])
def test_capture_of_non_contiguous_logits_is_that_of_their_copy(c, n_real):
    """Logits in any memory layout (a transposed tensor here) give the values of their contiguous copy."""
    z, y = _hard_logits(203, c, seed=c + 3)
    strided = z.t().contiguous().t()
    assert not strided.is_contiguous()
    a, b = dyn.batch_capture(z, y, n_real), dyn.batch_capture(strided, y, n_real)
    for f in dataclasses.fields(dyn.BatchCapture):
        assert torch.equal(getattr(a, f.name).nan_to_num(), getattr(b, f.name).nan_to_num()), f.name


def _assert_matches_float64_definitions(z: torch.Tensor, y: torch.Tensor, n_real: int, capture=None) -> None:
    """batch_capture (or ``capture``) against the definitions in float64: exact margins, first-index argmax ties
    (the target wins a tie: predicted), softmax values to float32 precision."""
    import torch.nn.functional as F

    c = z.shape[1]
    cap = (capture or dyn.batch_capture)(z, y, n_real)
    zd = z.double()
    rows = torch.arange(len(y))
    zy = zd[rows, y]
    others = zd.clone()
    others[rows, y] = float("-inf")
    best = others.amax(1)
    np.testing.assert_array_equal(cap.margin, (zy - best).float())  # exact: one float32 subtraction
    second = zd.sort(dim=1, descending=True).values[:, 1]
    np.testing.assert_array_equal(cap.margin_yang, torch.where(zy >= best, zy - best, zy - second).float())
    np.testing.assert_array_equal(cap.other, others[:, :n_real].argmax(1))  # torch's argmax: the first maximum
    real = y < n_real
    yr = y.clamp(max=n_real - 1)
    zr = zd[:, :n_real]
    pred_all = torch.where(zy >= best, y, zd.scatter(1, y.view(-1, 1), float("-inf")).argmax(1))
    pred_real = torch.where(zy >= others[:, :n_real].amax(1), y, others[:, :n_real].argmax(1))
    np.testing.assert_array_equal(cap.pred, torch.where(real, pred_real, pred_all))
    p = torch.softmax(zd, 1)
    pr = torch.softmax(zr, 1)
    prob = torch.where(real, pr[rows, yr], p[rows, y])
    el2n = torch.where(real, (pr - F.one_hot(yr, n_real).double()).norm(dim=1),
                       (p - F.one_hot(y, c).double()).norm(dim=1))
    loss = F.cross_entropy(zd, y, reduction="none")
    np.testing.assert_allclose(cap.prob, prob, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(cap.el2n, el2n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cap.loss, loss, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(cap.el2n).all() and torch.equal(torch.isinf(cap.loss), torch.isinf(zy))


@pytest.fixture(params=["fused", "two steps"])
def shift(request, monkeypatch):
    """The CPU capture's shift and scale: one fused multiply-add (at every class count here; on this build's torch)
    or two steps (what a torch build whose ``addcmul`` rounds twice gets)."""
    if request.param == "fused":
        monkeypatch.setattr(dyn, "FMA_MIN_CLASSES", 1)
    else:
        monkeypatch.setitem(dyn._fma, "ok", False)
    return request.param


@pytest.mark.parametrize(("c", "n_real"), [(3, 3), (10, 10), (11, 10), (1000, 1000), (1001, 1000)])
def test_capture_on_ties_infinite_and_huge_logits_matches_float64_definitions(shift, c, n_real):
    """Exact margins, first-index argmax ties (the target wins a tie: predicted), and float64 softmax values."""
    z, y = _hard_logits(400, c, seed=c + 1)
    _assert_matches_float64_definitions(z, y, n_real)


@pytest.mark.parametrize(("c", "n_real"), [(3, 3), (10, 10), (11, 10), (1000, 1000), (1001, 1000)])
def test_torch_path_of_other_devices_matches_float64_definitions(c, n_real):
    """The torch operations a GPU runs (no numpy, no floor), run here on the CPU: the same definitions."""
    z, y = _hard_logits(400, c, seed=c + 2)
    _assert_matches_float64_definitions(z, y, n_real, lambda z, y, n: dyn._capture(z, y, n, torch_ops=True))


@pytest.mark.parametrize(("c", "n_real"), [(2, 2), (10, 10), (11, 10), (1000, 1000), (1001, 1000)])
def test_overwrite_uses_the_logits_as_workspace_and_gives_the_same_values(monkeypatch, shift, c, n_real):
    """``overwrite=True`` on a float32 C-contiguous CPU tensor works in the logits themselves (every class real):
    the values are those of the default, which leaves the logits as they were; in steps as in one."""
    z, y = _hard_logits(203, c, seed=c + 5)
    kept = z.clone()
    ref = dyn.batch_capture(z, y, n_real)
    assert torch.equal(z.nan_to_num(), kept.nan_to_num()) and torch.equal(z.isnan(), kept.isnan())
    for values in (None, 7 * c):  # one step, 7 rows per step
        if values:
            monkeypatch.setattr(dyn, "WORKSPACE_VALUES", values)
        zo = kept.clone()
        got = dyn.batch_capture(zo, y, n_real, overwrite=True)
        assert torch.equal(zo.nan_to_num(), kept.nan_to_num()) == (n_real < c)  # a threshold pass copies
        for f in dataclasses.fields(dyn.BatchCapture):
            a, b = getattr(ref, f.name), getattr(got, f.name)
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), f.name


def test_overwrite_leaves_other_layouts_and_dtypes_to_the_workspace():
    """Logits that are not C-contiguous float32 are not written to, even with ``overwrite=True``."""
    z, y = _hard_logits(64, 10, seed=9)
    for logits in (z.t().contiguous().t(), z.double(), z.half()):
        kept = logits.clone()
        got = dyn.batch_capture(logits, y, overwrite=True)
        assert torch.equal(logits.nan_to_num(), kept.nan_to_num())
        np.testing.assert_array_equal(got.margin, dyn.batch_capture(kept.float(), y).margin)


@pytest.mark.parametrize(("c", "n_real"), [(10, 10), (11, 10), (1000, 1000)])
def test_logits_far_from_zero_keep_the_float64_values(shift, c, n_real):
    """Softmax values do not depend on a common offset: rows shifted by up to 3e7 (around the fused shift-and-scale's
    limit FMA_MAX_TOP = 2^22, where fl(top log2 e) is off by up to 1/2) keep float64's p(y), loss and EL2N."""
    g = torch.Generator().manual_seed(c)
    z = torch.randn(400, c, generator=g) * 4
    z += torch.tensor([0.0, 1e3, -1e5, 3e5, 1e6, -2e6, 4e6, 3e7]).repeat(50).view(-1, 1)
    z = z.float()
    _assert_matches_float64_definitions(z, torch.randint(0, c, (400,), generator=g), n_real)


def _below(v: float) -> float:
    """The float32 just below ``v``."""
    return float(np.nextafter(np.float32(v), np.float32(-np.inf)))


@pytest.mark.parametrize(("c", "n_real"), [(6, 6), (7, 6)])
def test_runner_up_below_the_softmax_floor_or_lost_in_a_shift_is_exact(shift, c, n_real):
    """The CPU capture finds the runner-up on a copy of the logits floored at top - SOFTMAX_FLOOR: a row whose
    other logits all lie at or below the floor is redone from the logits (ties among them go to the first
    index), and logits that round to the same value once the top is subtracted still keep their order."""
    inf = float("inf")
    rows = [
        [100.0, 5.0, 7.0, 7.0, 3.0, -inf],  # every other logit floored to 70: the runner-up is the first 7
        [40.0, 5.0, 10.0, 10.0, 2.0, 1.0],  # 10 is exactly the floor, 5 before it is floored up to it
        [1e30, 1.0, 2.0, 2.0, -1e30, 0.0],  # 1e30 - 30 rounds to 1e30: the floor is the float below
        [-1e30, -3e30, -2e30, -2e30, -inf, -4e30],  # the same below zero
        [10.0, 0.5, _below(0.5), float(np.nextafter(np.float32(0.5), np.float32(1))), 0.25, -1.0],  # z - 10 ties
        [0.0, -inf, -inf, -inf, -inf, -inf],  # one finite logit
        [3.0, 3.0, -40.0, 3.0, -50.0, 2.0],  # a tie at the top
    ]
    z = torch.tensor(rows, dtype=torch.float32)
    z = torch.cat([z, torch.full((len(rows), c - 6), -80.0)], dim=1)  # a fake class far below, in a threshold pass
    for target in range(c):
        _assert_matches_float64_definitions(z, torch.full((len(rows),), target), n_real)
    cap = dyn.batch_capture(z, torch.zeros(len(rows), dtype=torch.long), n_real)
    assert cap.other.tolist() == [2, 2, 2, 2, 3, 0, 1]


def test_infinite_top_logit_gives_the_limits(shift):
    """A +inf logit takes all the mass: p(y) = 0, an infinite loss and EL2N = sqrt(2) for any other target."""
    z = torch.tensor([[1.0, float("inf"), 2.0, 2.0], [float("inf"), -1.0, float("-inf"), 0.0]])
    cap = dyn.batch_capture(z, torch.tensor([2, 3]))
    assert cap.prob.tolist() == [0.0, 0.0] and cap.loss.tolist() == [float("inf")] * 2
    assert cap.margin.tolist() == [float("-inf")] * 2 and cap.pred.tolist() == [1, 0] and cap.other.tolist() == [1, 0]
    np.testing.assert_allclose(cap.el2n, [2**0.5] * 2, rtol=1e-6)


def test_yang_never_below_pleiss():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 7, generator=g)
    y = torch.randint(0, 7, (500,), generator=g)
    c = dyn.batch_capture(z, y)
    assert (c.margin_yang >= c.margin - 1e-6).all()
    top = z.argmax(1) == y
    assert torch.allclose(c.margin_yang[top], c.margin[top])


def test_parity_with_aum_package(tmp_path):
    """Identical logits, targets and sample ids through the `aum` package and through our capture."""
    from aum import AUMCalculator

    rng = np.random.default_rng(0)
    n, classes, epochs, batch = 300, 10, 5, 64
    calc = AUMCalculator(str(tmp_path), compressed=True)
    ours = np.zeros((epochs, n))
    ref_margins = np.zeros((epochs, n))
    targets_all = rng.integers(0, classes, n)
    for e in range(epochs):
        perm = rng.permutation(n)
        for s in range(0, n, batch):
            idx = perm[s : s + batch]
            logits = torch.tensor(rng.normal(size=(idx.size, classes)) * 3, dtype=torch.float32)
            targets = torch.tensor(targets_all[idx])
            records = calc.update(logits, targets, [int(i) for i in idx])
            for i in idx:
                ref_margins[e, i] = records[int(i)].margin
            ours[e, idx] = dyn.batch_capture(logits, targets).margin.numpy()
            np.testing.assert_allclose(dyn.pleiss_margin(logits, targets).numpy(), ours[e, idx], atol=1e-6)
    np.testing.assert_allclose(ours, ref_margins, atol=1e-6)
    ref_aum = np.array([calc.sums[i] / calc.counts[i] for i in range(n)])
    np.testing.assert_allclose(dyn.area_under_margin(ours), ref_aum, atol=1e-6)


def test_aum_window_and_nan_epochs():
    m = np.array([[1.0, 2.0], [3.0, np.nan], [5.0, 6.0]])
    assert dyn.area_under_margin(m, 1).tolist() == [4.0, 6.0]
    assert dyn.area_under_margin(m, 0, 2)[0] == 2.0
    with pytest.raises(ValueError, match="empty AUM window"):
        dyn.area_under_margin(m, 3)


def test_threshold_cutoff_is_percentile():
    x = np.arange(101, dtype=float)
    assert dyn.threshold_cutoff(x, 99) == pytest.approx(99.0)
    with pytest.raises(ValueError):
        dyn.threshold_cutoff(np.array([np.nan]))


def test_gmm_cutoff_separates_two_groups():
    rng = np.random.default_rng(1)
    clean = rng.normal(3.0, 0.5, 900)
    noisy = rng.normal(-2.0, 0.5, 100)
    cut = dyn.gmm_cutoff(np.concatenate([clean, noisy]))
    assert -1.0 < cut < 1.5
    assert dyn.gmm_cutoff(rng.normal(3.0, 0.5, 1000)) < 1.0  # one group: flags (almost) nothing


def test_cartography_by_hand():
    prob = np.array([[0.2, 0.9], [0.4, 0.9], [0.6, 0.9]])
    correct = np.array([[0, 1], [0, 1], [1, 1]], dtype=bool)
    conf, var, acc = dyn.cartography(prob, correct)
    assert conf.tolist() == pytest.approx([0.4, 0.9])
    assert var.tolist() == pytest.approx([np.std([0.2, 0.4, 0.6]), 0.0])  # population std
    assert acc.tolist() == pytest.approx([1 / 3, 1.0])


def test_forgetting_and_first_iteration_by_hand():
    # columns: learned at epoch 2 and kept; learned, forgotten twice; never learned; always right
    c = np.array([[0, 1, 0, 1], [0, 0, 0, 1], [1, 1, 0, 1], [1, 0, 0, 1]], dtype=bool)
    assert forgetting_events(c).tolist() == [0, 2, 4, 0]
    assert first_iteration(c).tolist() == pytest.approx([0.5, 1.0, 1.0, 0.0])


def test_auto_cutoff_falls_back_to_the_threshold_rule():
    from engine.scores.registry import pass_cutoff

    rng = np.random.default_rng(0)
    one_group = rng.normal(3.0, 1.0, 1000)
    thr = rng.normal(-1.0, 0.5, 100)
    assert pass_cutoff("auto", one_group, thr, 99.0, 0) == pytest.approx(np.percentile(thr, 99))
    assert pass_cutoff("auto", one_group, None, 99.0, 0) == float("-inf")  # no evidence of errors: flag nothing
    two = np.concatenate([one_group, rng.normal(-3.0, 0.5, 100)])
    assert pass_cutoff("auto", two, thr + 10, 99.0, 0) < 3.0  # the mixture is lower than a loose threshold rule
