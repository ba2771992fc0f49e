"""Tests of the batched QP interior point kernel ``reference_layers.kernels.qp_pdipm``.

Problems with a known solution are built backwards from a chosen primal-dual
point ``(y*, lam*, nu*, s*)`` with strict complementarity (``nu*_i > 0`` exactly
on the active rows, ``s*_i > 0`` exactly on the others): ``h = G y* + s*``,
``b = A y*``, ``q = -(Q y* + A'lam* + G'nu*)``.  With at most ``n - p`` active
rows and ``Q`` positive definite the KKT point is unique, so the solver must
recover all of ``y*``, ``lam*`` and ``nu*``.
"""

import numpy as np
import pytest
from scipy.optimize import linprog

from reference_layers.kernels.qp_pdipm import (
    KKT_JACOBIAN_FLAG_MESSAGES,
    QP_STATUS_MESSAGES,
    KKTJacobianFlag,
    QPResult,
    QPStatus,
    kkt_jacobian_factor,
    kkt_jacobian_solve,
    kkt_jacobian_solve_factored,
    polish_active_set,
    solve_qp_batch,
)


# --------------------------------------------------------------------------- #
# problem generators
# --------------------------------------------------------------------------- #
def known_solution_qps(B, n, m, p, seed=0, lp=False, n_active=None):
    """Batch of QPs with a unique known KKT point (see module docstring).

    ``n_active`` may be an int or a per-instance sequence; the default is
    ``n - p`` active rows for an LP (a nondegenerate vertex) and a random number
    in ``[0, n - p]`` for a QP (mixed active set sizes in one batch).
    """
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((B, n, n))
    Q = np.zeros((B, n, n)) if lp else M @ M.transpose(0, 2, 1) / n + 0.2 * np.eye(n)
    G = rng.standard_normal((B, m, n))
    A = rng.standard_normal((B, p, n))
    y = rng.standard_normal((B, n))
    lam = rng.standard_normal((B, p))
    if n_active is None:
        n_active = ([min(m, n - p)] * B if lp
                    else rng.integers(0, min(m, n - p) + 1, size=B))
    n_active = np.broadcast_to(n_active, (B,))
    act = np.zeros((B, m), dtype=bool)
    for k in range(B):
        act[k, rng.choice(m, int(n_active[k]), replace=False)] = True
    nu = np.where(act, rng.uniform(0.5, 2.0, (B, m)), 0.0)
    s = np.where(act, 0.0, rng.uniform(0.5, 2.0, (B, m)))
    h = np.einsum("bij,bj->bi", G, y) + s
    b = np.einsum("bij,bj->bi", A, y)
    q = -(np.einsum("bij,bj->bi", Q, y) + np.einsum("bji,bj->bi", A, lam)
          + np.einsum("bji,bj->bi", G, nu))
    return (Q, q, G, h, A, b), (y, lam, nu, s)


def single(Q, q, G, h, A, b):
    """Batch of one from per-instance lists (any of m, p may be 0)."""
    q = np.asarray(q, float)
    n = q.size
    return (np.asarray(Q, float)[None], q[None],
            np.asarray(G, float).reshape(1, -1, n), np.asarray(h, float)[None],
            np.asarray(A, float).reshape(1, -1, n), np.asarray(b, float)[None])


def stack(*problems):
    """Concatenate batches (same n, m, p)."""
    return tuple(np.concatenate(parts) for parts in zip(*problems))


def kkt_dense(Q, G, A, y, h, nu):
    """Dense Jacobian of F(y, lam, nu) = [Qy + q + A'lam + G'nu; Ay - b; nu*(Gy - h)]."""
    n, p, m = Q.shape[0], A.shape[0], G.shape[0]
    J = np.zeros((n + p + m, n + p + m))
    J[:n, :n] = 0.5 * (Q + Q.T)
    J[:n, n:n + p] = A.T
    J[:n, n + p:] = G.T
    J[n:n + p, :n] = A
    J[n + p:, :n] = nu[:, None] * G
    J[n + p:, n + p:] = np.diag(G @ y - h)
    return J


def assert_solved(res, truth, atol=1e-8, idx=slice(None)):
    y, lam, nu, _ = truth
    assert np.all(res.status[idx] == QPStatus.SOLVED), res.status[idx]
    assert np.all(res.kkt_residual[idx] <= 1e-10)
    np.testing.assert_allclose(res.y[idx], y[idx], atol=atol, rtol=0)
    np.testing.assert_allclose(res.lam[idx], lam[idx], atol=atol, rtol=0)
    np.testing.assert_allclose(res.nu[idx], nu[idx], atol=atol, rtol=0)


# --------------------------------------------------------------------------- #
# solutions
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("n,m,p", [(8, 12, 2), (6, 15, 0), (7, 0, 3), (5, 0, 0),
                                   (12, 30, 5)])
def test_recovers_known_solution(n, m, p):
    prob, truth = known_solution_qps(24, n, m, p, seed=n + m + p)
    res = solve_qp_batch(*prob)
    assert isinstance(res, QPResult)
    assert res.y.shape == (24, n) and res.lam.shape == (24, p)
    assert res.nu.shape == (24, m) and res.s.shape == (24, m)
    assert res.status.shape == res.iterations.shape == res.kkt_residual.shape == (24,)
    assert_solved(res, truth)
    assert np.all(res.nu >= 0) and np.all(res.s >= 0)
    G, h = prob[2], prob[3]
    np.testing.assert_allclose(res.s, h - np.einsum("bij,bj->bi", G, res.y), atol=1e-8)
    assert res.iterations.max() <= 25


def test_mixed_active_set_sizes_in_one_batch():
    n, m, p = 10, 16, 2
    prob, truth = known_solution_qps(9, n, m, p, seed=3, n_active=np.arange(9))
    res = solve_qp_batch(*prob)
    assert_solved(res, truth)
    n_act = (res.nu > 1e-6).sum(axis=1)
    np.testing.assert_array_equal(n_act, np.arange(9))


def test_linear_program_known_vertex():
    prob, truth = known_solution_qps(16, 6, 14, 2, seed=7, lp=True)
    res = solve_qp_batch(*prob)
    assert_solved(res, truth)


def test_against_scipy_linprog():
    rng = np.random.default_rng(11)
    n, m, p = 6, 12, 2
    for k in range(3):
        G = np.vstack([rng.standard_normal((m - 2 * n, n)), np.eye(n), -np.eye(n)])
        h = np.concatenate([rng.uniform(1, 2, m - 2 * n), np.full(2 * n, 3.0)])
        A = rng.standard_normal((p, n))
        b = A @ rng.uniform(-0.5, 0.5, n)
        q = rng.standard_normal(n)
        ref = linprog(q, A_ub=G, b_ub=h, A_eq=A, b_eq=b, bounds=[(None, None)] * n,
                      method="highs")
        assert ref.status == 0
        res = solve_qp_batch(*single(np.zeros((n, n)), q, G, h, A, b))
        assert res.status[0] == QPStatus.SOLVED
        assert abs(q @ res.y[0] - ref.fun) <= 1e-8 * (1 + abs(ref.fun))
        np.testing.assert_allclose(res.y[0], ref.x, atol=1e-6)


def _enumerated_kkt_point(Q, q, G, h, A, b):
    """The unique KKT point of a strictly convex QP by enumerating active sets.

    For every subset ``a`` of at most ``n - p`` inequality rows, solve the
    equality-constrained KKT system with ``G_a y = h_a`` and keep the one that
    is a KKT point: ``G y <= h`` and ``nu_a >= 0`` (to rounding). ``Q`` positive
    definite makes the point unique, so this is an exact reference that does not
    depend on any iterative solver succeeding (SLSQP returns status 8 on these
    instances under scipy 1.17).
    """
    from itertools import combinations
    n, m, p = len(q), len(h), len(b)
    found = []
    scale = 1 + np.abs(h).max() + np.abs(q).max()
    for k in range(0, n - p + 1):
        for a in combinations(range(m), k):
            a = list(a)
            C = np.vstack([A, G[a]])
            K = np.block([[Q, C.T], [C, np.zeros((len(C), len(C)))]])
            z = np.linalg.solve(K, np.concatenate([-q, b, h[a]]))
            y, nu_a = z[:n], z[n + p:]
            if np.all(G @ y <= h + 1e-12 * scale) and np.all(nu_a >= -1e-12 * scale):
                nu = np.zeros(m)
                nu[a] = nu_a
                found.append((y, z[n:n + p], nu))
    assert found, "no KKT point found by enumeration"
    y, lam, nu = found[0]
    # the KKT conditions, checked explicitly
    np.testing.assert_allclose(Q @ y + q + A.T @ lam + G.T @ nu, 0, atol=1e-10 * scale)
    np.testing.assert_allclose(A @ y, b, atol=1e-12 * scale)
    for other in found[1:]:   # duplicates only (a zero multiplier on an added row)
        np.testing.assert_allclose(other[0], y, atol=1e-9 * scale)
    return y, lam, nu


def test_against_enumerated_active_sets():
    rng = np.random.default_rng(12)
    n, m, p = 5, 8, 1
    for k in range(2):
        M = rng.standard_normal((n, n))
        Q = M @ M.T + 0.5 * np.eye(n)
        q = rng.standard_normal(n) * 3
        G = rng.standard_normal((m, n))
        h = rng.uniform(0.1, 1.0, m)
        A = rng.standard_normal((p, n))
        b = rng.standard_normal(p) * 0.1
        y_ref, lam_ref, nu_ref = _enumerated_kkt_point(Q, q, G, h, A, b)
        res = solve_qp_batch(*single(Q, q, G, h, A, b))
        assert res.status[0] == QPStatus.SOLVED
        # the interior point stops at a relative KKT residual tol = 1e-10; cond(K) ~ 1e2 here
        np.testing.assert_allclose(res.y[0], y_ref, atol=1e-8)
        np.testing.assert_allclose(res.lam[0], lam_ref, atol=1e-7)
        np.testing.assert_allclose(res.nu[0], nu_ref, atol=1e-7)


def test_singular_psd_q_and_eliminated_free_direction():
    # Q = 0 in y2, y2 fixed by an equality only: K = Q + G'DG is singular and
    # only the rho A'A augmentation makes the Newton system definite.
    prob = single(np.diag([1.0, 0.0]), [1.0, 1.0], [[-1.0, 0.0]], [0.5], [[0.0, 1.0]],
                  [3.0])
    res = solve_qp_batch(*prob)
    assert res.status[0] == QPStatus.SOLVED
    np.testing.assert_allclose(res.y[0], [-0.5, 3.0], atol=1e-9)
    np.testing.assert_allclose(res.lam[0], [-1.0], atol=1e-9)
    np.testing.assert_allclose(res.nu[0], [0.5], atol=1e-9)


def test_warm_start_from_solution_is_fast():
    prob, truth = known_solution_qps(8, 8, 12, 2, seed=21)
    cold = solve_qp_batch(*prob)
    warm = solve_qp_batch(*prob, warm_start=(cold.y, cold.lam, cold.nu, cold.s))
    assert_solved(warm, truth)
    assert warm.iterations.max() < cold.iterations.min()


def test_thread_split_gives_identical_results():
    prob, truth = known_solution_qps(10, 6, 9, 1, seed=13)
    one = solve_qp_batch(*prob, num_threads=1)
    three = solve_qp_batch(*prob, num_threads=3)
    for a, b in zip(one, three):
        np.testing.assert_array_equal(a, b)


def test_nonsymmetric_q_uses_symmetric_part():
    prob, truth = known_solution_qps(4, 6, 8, 1, seed=5)
    Q = prob[0]
    skew = np.random.default_rng(0).standard_normal(Q.shape)
    Qn = Q + (skew - skew.transpose(0, 2, 1))
    res = solve_qp_batch(Qn, *prob[1:])
    assert_solved(res, truth)


# --------------------------------------------------------------------------- #
# status codes: each bad instance sits in a batch with good ones
# --------------------------------------------------------------------------- #
def _with_good(bad, n, m, p, seed=0):
    """Batch [good, good, bad, good]; truth has a NaN placeholder at index 2."""
    good, truth = known_solution_qps(3, n, m, p, seed=seed)
    batch = stack(tuple(x[:2] for x in good), bad, tuple(x[2:] for x in good))
    truth = tuple(np.concatenate([t[:2], np.full_like(t[:1], np.nan), t[2:]])
                  for t in truth)
    return batch, truth


def _check_good(res, truth):
    idx = [0, 1, 3]
    assert_solved(res, truth, idx=idx)


def test_primal_infeasible_contradictory_bounds():
    n, m, p = 2, 3, 1
    # y1 <= 0 and y1 >= 1
    bad = single(np.eye(2), [1.0, 1.0], [[1, 0], [-1, 0], [0, 1]], [0.0, -1.0, 5.0],
                 [[1.0, 1.0]], [0.5])
    batch, truth = _with_good(bad, n, m, p)
    res = solve_qp_batch(*batch)
    assert res.status[2] == QPStatus.PRIMAL_INFEASIBLE
    _check_good(res, truth)
    # the returned multipliers are (close to) a Farkas certificate
    lam, nu = res.lam[2], res.nu[2]
    G, h, A, b = batch[2][2], batch[3][2], batch[4][2], batch[5][2]
    ctb = b @ lam + h @ nu
    assert ctb < 0 and np.abs(A.T @ lam + G.T @ nu).max() < 1e-6 * abs(ctb)


def test_primal_infeasible_lp_equality_vs_bounds():
    # y1 + y2 = 3 with y <= 1
    prob = single(np.zeros((2, 2)), [1.0, -1.0], np.eye(2), [1.0, 1.0], [[1.0, 1.0]],
                  [3.0])
    assert solve_qp_batch(*prob).status[0] == QPStatus.PRIMAL_INFEASIBLE


def test_dual_infeasible_lp_free_descent_direction():
    n, m, p = 2, 3, 1
    # minimize -y1 - y2 s.t. y1 - y2 <= 0, -y1 <= 0, -y2 <= 1, y1 - y2 = 0: the
    # ray d = (1, 1) keeps every constraint and decreases the objective
    bad = single(np.zeros((2, 2)), [-1.0, -1.0], [[1, -1], [-1, 0], [0, -1]],
                 [0.0, 0.0, 1.0], [[1.0, -1.0]], [0.0])
    batch, truth = _with_good(bad, n, m, p, seed=1)
    res = solve_qp_batch(*batch)
    assert res.status[2] == QPStatus.DUAL_INFEASIBLE
    _check_good(res, truth)


def test_dual_infeasible_psd_q_unconstrained_direction():
    prob = single(np.diag([1.0, 0.0]), [0.0, -1.0], np.zeros((0, 2)), [],
                  np.zeros((0, 2)), [])
    assert solve_qp_batch(*prob).status[0] == QPStatus.DUAL_INFEASIBLE


def test_nonconvex_q_detected():
    n, m, p = 2, 3, 1
    bad = single(np.diag([1.0, -1.0]), [0.0, 0.0], [[1, 0], [0, 1], [-1, -1]],
                 [1.0, 1.0, 1.0], [[1.0, 0.0]], [0.0])
    batch, truth = _with_good(bad, n, m, p, seed=2)
    res = solve_qp_batch(*batch)
    assert res.status[2] == QPStatus.NONCONVEX
    assert np.isnan(res.y[2]).all() and res.iterations[2] == 0
    _check_good(res, truth)


def test_rank_deficient_equality():
    n, m, p = 2, 3, 2
    Aeq = [[1.0, 1.0], [1.0, 1.0]]
    G = [[1, 0], [0, 1], [-1, -1]]
    inconsistent = single(np.eye(2), [0.0, 0.0], G, [1.0, 1.0, 1.0], Aeq, [1.0, 2.0])
    redundant = single(np.eye(2), [0.0, 0.0], G, [1.0, 1.0, 1.0], Aeq, [1.0, 1.0])
    batch, truth = _with_good(inconsistent, n, m, p, seed=3)
    res = solve_qp_batch(*batch)
    assert res.status[2] == QPStatus.RANK_DEFICIENT_EQUALITY
    assert np.isnan(res.y[2]).all()
    _check_good(res, truth)
    # consistent duplicated rows: flagged, but the reduced problem is solved ...
    res = solve_qp_batch(*redundant)
    assert res.status[0] == QPStatus.RANK_DEFICIENT_EQUALITY
    np.testing.assert_allclose(res.y[0], [0.5, 0.5], atol=1e-9)
    # ... and accepted when asked for
    res = solve_qp_batch(*redundant, allow_redundant_equalities=True)
    assert res.status[0] == QPStatus.SOLVED
    np.testing.assert_allclose(res.y[0], [0.5, 0.5], atol=1e-9)
    np.testing.assert_allclose(res.lam[0], [-0.5, 0.0], atol=1e-9)


def test_max_iter():
    prob, truth = known_solution_qps(4, 6, 10, 1, seed=8)
    res = solve_qp_batch(*prob, max_iter=1)
    assert np.all(res.status == QPStatus.MAX_ITER)
    assert np.all(res.iterations == 1)
    assert np.all(np.isfinite(res.y))


def test_nonfinite_data_and_messages():
    prob, truth = known_solution_qps(3, 4, 5, 1, seed=9)
    prob = tuple(x.copy() for x in prob)
    prob[1][1, 0] = np.nan
    res = solve_qp_batch(*prob)
    assert res.status[1] == QPStatus.NUMERICAL_ERROR
    assert_solved(res, truth, idx=[0, 2])
    for st in QPStatus:
        assert isinstance(QP_STATUS_MESSAGES[st], str) and QP_STATUS_MESSAGES[st]
    for fl in KKTJacobianFlag:
        assert KKT_JACOBIAN_FLAG_MESSAGES[fl]


def test_shape_errors():
    prob, _ = known_solution_qps(2, 3, 4, 1)
    with pytest.raises(ValueError):
        solve_qp_batch(prob[0], prob[1][:, :2], *prob[2:])


# --------------------------------------------------------------------------- #
# KKT Jacobian solves
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("n,m,p,lp", [(8, 12, 2, False), (6, 0, 2, False),
                                      (5, 9, 0, True)])
def test_kkt_jacobian_solve_matches_dense(transpose, n, m, p, lp):
    B = 6
    prob, truth = known_solution_qps(B, n, m, p, seed=31 + n, lp=lp)
    Q, q, G, h, A, b = prob
    y, lam, nu, s = truth          # exact solution: s_i = 0 on active rows
    rng = np.random.default_rng(1)
    N = n + p + m
    R = rng.standard_normal((B, N))
    out = kkt_jacobian_solve(Q, G, A, s, nu, R, transpose=transpose)
    assert np.all(out.flag == KKTJacobianFlag.OK)
    for k in range(B):
        J = kkt_dense(Q[k], G[k], A[k], y[k], h[k], nu[k])
        ref = np.linalg.solve(J.T if transpose else J, R[k])
        np.testing.assert_allclose(out.z[k], ref, atol=1e-9 * (1 + abs(ref).max()))


def test_kkt_jacobian_at_interior_point_solution_many_rhs():
    B, n, m, p = 5, 7, 11, 2
    prob, _ = known_solution_qps(B, n, m, p, seed=41)
    Q, q, G, h, A, b = prob
    res = solve_qp_batch(*prob)
    fac = kkt_jacobian_factor(Q, G, A, res.s, res.nu)
    assert np.all(fac.flag == 0)
    R = np.random.default_rng(2).standard_normal((B, 4, n + p + m))
    for transpose in (False, True):
        Z = kkt_jacobian_solve_factored(fac, R, transpose=transpose)
        assert Z.shape == R.shape
        for k in range(B):
            J = kkt_dense(Q[k], G[k], A[k], res.y[k], G[k] @ res.y[k] + res.s[k], res.nu[k])
            J = J.T if transpose else J
            np.testing.assert_allclose(np.einsum("ij,rj->ri", J, Z[k]), R[k], atol=1e-8)


def test_kkt_jacobian_flags_degenerate_and_singular():
    B, n, m, p = 4, 6, 8, 2
    prob, truth = known_solution_qps(B, n, m, p, seed=51, n_active=2)
    Q, q, G, h, A, b = prob
    y, lam, nu, s = (x.copy() for x in truth)
    inactive = np.nonzero(nu[0] == 0)[0][0]
    s[0, inactive] = 0.0            # s_i = nu_i = 0: strict complementarity fails
    A = A.copy()
    A[1, 1] = A[1, 0]               # dependent equality rows: J singular
    R = np.ones((B, n + p + m))
    out = kkt_jacobian_solve(Q, G, A, s, nu, R)
    assert out.flag[0] == KKTJacobianFlag.DEGENERATE
    assert out.flag[1] == KKTJacobianFlag.SINGULAR
    assert np.all(out.flag[2:] == KKTJacobianFlag.OK)
    assert np.isnan(out.z[:2]).all() and np.isfinite(out.z[2:]).all()


def test_default_thread_count_honours_numba_num_threads(monkeypatch):
    """The batch is split over at most numba.get_num_threads() threads; same result."""
    import numba
    import reference_layers.kernels.qp_pdipm as kernel
    prob, truth = known_solution_qps(6, 5, 8, 1, seed=33)
    ref = solve_qp_batch(*prob, num_threads=1)
    calls = []
    real = kernel._run_batch

    def spy(fn, B, num_threads):
        calls.append(num_threads)
        return real(fn, B, num_threads)
    monkeypatch.setattr(numba, "get_num_threads", lambda: 1)
    monkeypatch.setattr(kernel, "_run_batch", spy)
    chunks = []
    monkeypatch.setattr(kernel, "ThreadPoolExecutor", lambda *a, **k: chunks.append(1))
    kernel._POOL = None
    res = solve_qp_batch(*prob)
    assert not chunks            # one thread: no pool was created
    np.testing.assert_array_equal(res.y, ref.y)


# --------------------------------------------------------------------------- #
# compiled active-set polish
# --------------------------------------------------------------------------- #
_POLISH = dict(steps=24, accept=1e-13, sign_tol=1e-12)


def test_polish_recovers_known_solution_and_thread_split_is_identical():
    """From the interior point's margins the polish lands on the exact KKT point, and
    splitting the batch over threads changes no bit."""
    prob, truth = known_solution_qps(12, 6, 10, 1, seed=41)
    res = solve_qp_batch(*prob)
    args = (*prob, res.y, res.lam, np.maximum(res.nu, 0.0), res.nu, res.s)
    one = polish_active_set(*args, num_threads=1, **_POLISH)
    two = polish_active_set(*args, num_threads=2, **_POLISH)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    y, lam, nu, done = one
    assert done.all()
    np.testing.assert_allclose(y, truth[0], atol=1e-12, rtol=0)
    np.testing.assert_allclose(lam, truth[1], atol=1e-12, rtol=0)
    np.testing.assert_allclose(nu, truth[2], atol=1e-12, rtol=0)


def test_polish_caps_an_overfull_active_set_by_score():
    """More rows marked active than n - p: the polish keeps the n - p highest scores.
    The true active rows score highest and the others tie below them, so with one
    step (no correction of the set) the polish succeeds only if the selection is right."""
    n, m = 4, 10
    prob, truth = known_solution_qps(1, n, m, 0, seed=5, n_active=n)
    act = truth[2][0] > 0
    nu_bar = np.where(act, 10.0, 1.0)[None]      # every row "active" (nu_bar > s_bar)
    s_bar = np.full((1, m), 1e-3)
    y0 = np.zeros((1, n))
    y, lam, nu, done = polish_active_set(*prob, y0, np.zeros((1, 0)), np.zeros((1, m)),
                                         nu_bar, s_bar, num_threads=1,
                                         **dict(_POLISH, steps=1))
    assert done.all()
    np.testing.assert_allclose(y, truth[0], atol=1e-12, rtol=0)
    np.testing.assert_allclose(nu, truth[2], atol=1e-12, rtol=0)


def test_compile_kernels_groups_and_unknown_group():
    from reference_layers.kernels.qp_pdipm import KERNEL_GROUPS, compile_kernels
    compile_kernels()                          # every group, from the cache after the first run
    compile_kernels(("kkt",))
    from nimplicit.errors import InvalidOptionError
    with pytest.raises(InvalidOptionError, match="unknown group.*'sovle'.*solve"):
        compile_kernels(("sovle",))
    assert set(KERNEL_GROUPS) == {"solve", "polish", "kkt"}


def test_read_only_inputs_reuse_the_one_compiled_specialization():
    """An unbatched layer hands the kernels read-only broadcast views (B = 1); numba
    would type them apart and compile every kernel again (once per read-only pattern).
    The wrappers copy read-only inputs, so each kernel keeps one signature."""
    from reference_layers.kernels import qp_pdipm as K
    from reference_layers.qp import qp_layer

    rng = np.random.default_rng(3)
    n, m, p = 3, 4, 1
    M = rng.standard_normal((n, n))
    Q, q = M @ M.T + np.eye(n), rng.standard_normal(n)
    G, h = rng.standard_normal((m, n)), np.ones(m)
    A, b = rng.standard_normal((p, n)), np.zeros(p)
    ro = [np.broadcast_to(x, (1,) + x.shape) for x in (Q, q, G, h, A, b)]
    assert not any(x.flags.writeable for x in ro)
    res_ro = solve_qp_batch(*ro, num_threads=1)
    res_w = solve_qp_batch(*(x.copy() for x in ro), num_threads=1)
    np.testing.assert_array_equal(res_ro.y, res_w.y)
    fac = kkt_jacobian_factor(ro[0], ro[2], ro[4], res_ro.s, res_ro.nu, num_threads=1)
    rhs = np.broadcast_to(np.ones(n + p + m), (1, n + p + m))
    z_ro = kkt_jacobian_solve_factored(fac, rhs, num_threads=1)
    fac_w = kkt_jacobian_factor(*(x.copy() for x in (ro[0], ro[2], ro[4])), res_w.s, res_w.nu,
                                num_threads=1)
    np.testing.assert_array_equal(z_ro, kkt_jacobian_solve_factored(fac_w, rhs.copy(),
                                                                    num_threads=1))
    polish_active_set(*ro, res_ro.y, res_ro.lam, res_ro.nu, res_ro.nu, res_ro.s,
                      num_threads=1, **dict(_POLISH, steps=1))
    qp_layer(Q, q, G, h, A, b)                 # the layer's own (unbatched) path
    for name in ("_qp_kernel", "_kkt_factor_kernel", "_kkt_solve_kernel", "_polish_kernel"):
        assert len(getattr(K, name).signatures) == 1, (name, getattr(K, name).signatures)
