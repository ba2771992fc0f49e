r"""Feasible, well-posed QPs with a controlled strict-complementarity margin.

Every instance is built backwards from a chosen primal-dual point: draw
``Q = M M^T / n + eps I`` (or ``Q = 0`` for an LP), ``G``, ``A`` and a solution
``y*``; pick the active set ``I_act`` (at most ``n - p`` rows, so that LICQ
holds generically), multipliers ``nu*_i in [margin, 1 + margin]`` on ``I_act``
and slacks ``s*_i in [margin, 1 + margin]`` off it, any ``lam*``; then

.. math::

    h = G y^\star + s^\star, \qquad b = A y^\star, \qquad
    q = -(Q y^\star + A^\top \lambda^\star + G^\top \nu^\star)

make ``(y*, lam*, nu*)`` satisfy the KKT conditions exactly, with strict
complementarity margin ``min_i max(nu*_i, s*_i) >= margin``.  With ``Q``
positive definite the KKT point is unique.  An LP needs exactly ``n - p``
active rows (a nondegenerate vertex).

``weakly_active_qp`` plants one constraint with ``nu*_i = 0`` and ``s*_i = 0``
(strict complementarity fails there: the layer is not differentiable).
``ill_posed_qp(kind)`` returns one instance per failure the layer must report.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as onp

try:
    from hypothesis import strategies as st
except ImportError:     # the generators work without hypothesis
    st = None


def kkt_jacobian(Q, G, A, nu, s) -> onp.ndarray:
    """The Jacobian of eq. 27 in ``(y, lam, nu)`` at a point with slack ``s`` (one instance)."""
    n, m, p = Q.shape[0], G.shape[0], A.shape[0]
    J = onp.zeros((n + p + m, n + p + m))
    J[:n, :n] = 0.5 * (Q + Q.T)
    J[:n, n:n + p], J[n:n + p, :n] = A.T, A
    J[:n, n + p:] = G.T
    J[n + p:, :n] = nu[:, None] * G
    J[n + p:, n + p:] = -onp.diag(s)
    return J


def planted_qp(rng: onp.random.Generator, n: int = 5, m: int = 8, p: int = 0,
               margin: float = 0.2, n_active: Optional[int] = None, lp: bool = False,
               eps: float = 0.2, weak: int = 0, max_condition: float = 1e3) -> dict:
    """One QP with a known KKT point (see the module docstring).

    Returns a dict with ``Q, q, G, h`` (and ``A, b`` when ``p > 0``) and the
    planted ``y, lam, nu, s``.  ``weak`` constraints (taken from the inactive
    ones) get ``nu_i = s_i = 0``.  Draws are repeated until the KKT Jacobian at
    the planted point has condition number ``<= max_condition`` (ignoring the
    weak rows), so that the solution is far (relative to its sensitivity) from
    an active-set change: finite differences with steps ~1e-4 stay smooth.
    """
    if p > n:
        raise ValueError(f"p = {p} equality rows exceed n = {n} unknowns")
    for _ in range(200):
        d = _planted_once(rng, n, m, p, margin, n_active, lp, eps, weak)
        A = d.get("A", onp.zeros((0, n)))
        nu, s = d["nu"].copy(), d["s"].copy()
        nu[(nu == 0) & (s == 0)] = 1.0   # a weak row is singular by design
        if onp.linalg.cond(kkt_jacobian(d["Q"], d["G"], A, nu, s)) <= max_condition:
            return d
    raise ValueError(f"no planted QP with condition <= {max_condition:g} in 200 draws "
                     f"(n={n}, m={m}, p={p}); raise max_condition")


def _planted_once(rng, n, m, p, margin, n_active, lp, eps, weak) -> dict:
    M = rng.standard_normal((n, n))
    Q = onp.zeros((n, n)) if lp else M @ M.T / n + eps * onp.eye(n)
    G = rng.standard_normal((m, n))
    A = rng.standard_normal((p, n))
    y = rng.standard_normal(n)
    lam = rng.standard_normal(p)
    most = min(m, n - p)
    if n_active is None:
        n_active = most if lp else int(rng.integers(0, most + 1))
    if n_active > most:
        raise ValueError(f"n_active = {n_active} > min(m, n - p) = {most}: LICQ would fail")
    perm = rng.permutation(m)
    active = onp.zeros(m, bool)
    active[perm[:n_active]] = True
    nu = onp.where(active, margin + rng.uniform(0, 1, m), 0.0)
    s = onp.where(active, 0.0, margin + rng.uniform(0, 1, m))
    if weak:
        idle = perm[n_active:n_active + weak]
        s[idle] = 0.0
    h = G @ y + s
    b = A @ y
    q = -(Q @ y + A.T @ lam + G.T @ nu)
    out = dict(Q=Q, q=q, G=G, h=h, y=y, lam=lam, nu=nu, s=s)
    if p:
        out.update(A=A, b=b)
    return out


def qp_inputs(rng: onp.random.Generator, n: int = 5, m: int = 8, p: int = 0,
              margin: float = 0.2, **kw) -> Tuple[onp.ndarray, ...]:
    """``(Q, q, G, h)`` or ``(Q, q, G, h, A, b)`` of :func:`planted_qp`."""
    d = planted_qp(rng, n, m, p, margin, **kw)
    return tuple(d[k] for k in (("Q", "q", "G", "h", "A", "b") if p else ("Q", "q", "G", "h")))


def batched_qp_inputs(rng: onp.random.Generator, batch: int = 3, n: int = 5, m: int = 8,
                      p: int = 0, margin: float = 0.2, shared: Tuple[str, ...] = (),
                      **kw) -> Tuple[onp.ndarray, ...]:
    """A batch of planted QPs, ``(B, ...)`` arrays; names in ``shared`` (``"Q"``,
    ``"G"``, ``"A"``) are one matrix for every instance (unbatched), the
    vectors are backed out per instance so each instance stays well posed."""
    names = ("Q", "q", "G", "h", "A", "b") if p else ("Q", "q", "G", "h")
    first = planted_qp(rng, n, m, p, margin, **kw)
    rows = []
    for k in range(batch):
        d = planted_qp(rng, n, m, p, margin, **kw)
        for name in shared:
            d[name] = first[name]
        # back out the vectors for the (possibly shared) matrices
        d["h"] = d["G"] @ d["y"] + d["s"]
        d["q"] = -(d["Q"] @ d["y"] + d["G"].T @ d["nu"]
                   + (d["A"].T @ d["lam"] if p else 0.0))
        if p:
            d["b"] = d["A"] @ d["y"]
        rows.append(d)
    return tuple(first[name] if name in shared else onp.stack([d[name] for d in rows])
                 for name in names)


def weakly_active_qp(rng: onp.random.Generator, n: int = 5, m: int = 8, p: int = 0,
                     margin: float = 0.2) -> Tuple[onp.ndarray, ...]:
    """A QP whose planted solution has one weakly active constraint (``nu_i = s_i = 0``)."""
    d = planted_qp(rng, n, m, p, margin, n_active=min(2, n - p), weak=1)
    return tuple(d[k] for k in (("Q", "q", "G", "h", "A", "b") if p else ("Q", "q", "G", "h")))


ILL_POSED = ("infeasible", "unbounded", "nonconvex", "rank-deficient", "not-converged")


def ill_posed_qp(kind: str, n: int = 4, m: int = 6) -> Tuple[tuple, dict]:
    """``(inputs, options)`` of a QP that fails in the way ``kind`` names (see ``ILL_POSED``)."""
    rng = onp.random.default_rng(7)
    Q, q = onp.eye(n), rng.standard_normal(n)
    G, h = rng.standard_normal((m, n)), rng.uniform(0.5, 1.0, m)
    if kind == "infeasible":          # y_0 <= -1 and -y_0 <= -1
        G2 = onp.zeros((2, n))
        G2[0, 0], G2[1, 0] = 1.0, -1.0
        return (Q, q, onp.vstack([G, G2]), onp.concatenate([h, [-1.0, -1.0]])), {}
    if kind == "unbounded":           # an LP with y_0 free to go to -inf
        G1 = onp.zeros((1, n))
        G1[0, 1] = 1.0
        q1 = onp.zeros(n)
        q1[0] = 1.0
        return (onp.zeros((n, n)), q1, G1, onp.ones(1)), {}
    if kind == "nonconvex":
        Qn = onp.eye(n)
        Qn[0, 0] = -1.0
        return (Qn, q, G, h), {}
    if kind == "rank-deficient":      # the second equality row repeats the first
        A = rng.standard_normal((1, n))
        return (Q, q, G, h, onp.vstack([A, A]), onp.array([0.1, 0.1])), {}
    if kind == "not-converged":
        return (Q, q, G, h), {"max_iter": 1}
    raise ValueError(f"unknown kind {kind!r}; choose one of {ILL_POSED}")


if st is not None:
    @st.composite
    def qps(draw, n: Tuple[int, int] = (2, 6), m: Tuple[int, int] = (1, 8),
            p: Tuple[int, int] = (0, 2), margin: Tuple[float, float] = (0.05, 1.0),
            lp: bool = False) -> Tuple[onp.ndarray, ...]:
        """Hypothesis strategy: inputs of a planted QP with margin in the given range."""
        nn = draw(st.integers(*n))
        pp = draw(st.integers(p[0], min(p[1], nn - 1)))
        mm = draw(st.integers(max(m[0], nn - pp if lp else 0), max(m[1], nn - pp if lp else 0)))
        mg = draw(st.floats(*margin))
        seed = draw(st.integers(0, 2 ** 32 - 1))
        return qp_inputs(onp.random.default_rng(seed), nn, mm, pp, mg, lp=lp)

    @st.composite
    def batched_qps(draw, batch: Tuple[int, int] = (1, 4), n: Tuple[int, int] = (2, 6),
                    m: Tuple[int, int] = (1, 8), p: Tuple[int, int] = (0, 2),
                    margin: Tuple[float, float] = (0.05, 1.0)) -> Tuple[onp.ndarray, ...]:
        """Hypothesis strategy: a batch of planted QPs, some matrices possibly shared."""
        nn = draw(st.integers(*n))
        pp = draw(st.integers(p[0], min(p[1], nn - 1)))
        shared = tuple(draw(st.sets(st.sampled_from(("Q", "G", "A") if pp else ("Q", "G")))))
        seed = draw(st.integers(0, 2 ** 32 - 1))
        return batched_qp_inputs(onp.random.default_rng(seed), draw(st.integers(*batch)), nn,
                                 draw(st.integers(*m)), pp, draw(st.floats(*margin)),
                                 shared=shared)
