"""Hostile inputs to the reference layers: qp_layer, ncut_layer,
iso_surface_layer, spectral_matching_layer, smac_layer, power_iteration_layer,
sinkhorn_layer (invariant: see tests/fuzz_harness.py).

Affinity-type inputs are differentiated through ``X -> (X + X') / 2`` so the
finite differences stay on symmetric matrices, the layers' domain.
"""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np

import reference_layers as rl
from fuzz_harness import (BAD_DTYPES, LAYOUTS, NONFINITE, NONFINITE_WORDS, as_dtype, case,
                          grad_check, hostile_tests, put_nonfinite, rescaled)
from verification.strategies.qp import qp_inputs

EXTREME = (1e-150, 1e-100, 1e-8, 1e8, 1e100, 1e150)
#: documented accuracy of the QP interior point (tol=1e-10, relative KKT residual)
QP_NOISE = 1e-9
OPTION_WORDS = ("option", "must", "unknown", "allowed", "expected", "got")


def _pick(draw, options, label):
    from hypothesis import strategies as st
    return draw(st.sampled_from(options), label=label)


def _int(draw, lo, hi, label):
    from hypothesis import strategies as st
    return draw(st.integers(lo, hi), label=label)


def _sym(X):
    return 0.5 * (X + anp.swapaxes(X, -1, -2))


def _options_case(call_with, opts):
    key = sorted(opts)[0]
    words = (key,) + tuple(str(v) for v in opts.values() if isinstance(v, str)) + tuple(
        k for v in opts.values() if isinstance(v, dict) for k in v)
    return case(lambda: call_with(**opts), must_raise=True, words=words, describe=f"options {opts}")


# ------------------------------------------------------------------------------
# qp_layer
# ------------------------------------------------------------------------------

def _qp(rng, n=4, m=6):
    return qp_inputs(rng, n=n, m=m)


def _qp_grad(*args):
    return lambda y: grad_check(lambda *a: rl.qp_layer(*a), *args, noise=QP_NOISE)


def qp_nonfinite(rng, draw):
    args = list(_qp(rng))
    k, value = _int(draw, 0, 3, "which"), _pick(draw, NONFINITE, "value")
    args[k] = put_nonfinite(args[k], _int(draw, 0, 30, "index"), value)
    return case(lambda: rl.qp_layer(*args), words=NONFINITE_WORDS,
                describe=f"qp_layer {value} in argument {k}")


def qp_dtype(rng, draw):
    args = list(_qp(rng))
    k, dtype = _int(draw, 0, 3, "which"), _pick(draw, BAD_DTYPES, "dtype")
    args[k] = as_dtype(args[k], dtype)
    grad = _qp_grad(*[np.asarray(a, float) for a in args]) if dtype in ("float32", "float16") else None
    return case(lambda: rl.qp_layer(*args), grad=grad, must_raise=(dtype == "complex128"),
                describe=f"qp_layer argument {k} as {dtype}")


def qp_layout(rng, draw):
    how = _pick(draw, sorted(LAYOUTS), "layout")
    args = [LAYOUTS[how](a) for a in _qp(rng)]
    return case(lambda: rl.qp_layer(*args), grad=_qp_grad(*args), must_succeed=True,
                describe=f"qp_layer {how} inputs")


def qp_scale(rng, draw):
    """Objective (Q, q) scaled by s, every constraint row (G_i, h_i) by t_i: y does not move."""
    Q, q, G, h = _qp(rng)
    s = _pick(draw, (1e-4, 1e-2, 1e2, 1e4), "objective scale")
    t = 10.0 ** rng.uniform(-4, 4, G.shape[0])
    fn = lambda Q, q, G, h: rl.qp_layer(s * Q, s * q, t[:, None] * G, t * h)
    return case(lambda: fn(Q, q, G, h), grad=lambda y: grad_check(fn, Q, q, G, h, noise=QP_NOISE),
                must_succeed=True, describe=f"qp_layer objective*{s:g}, rows*10^U(-4,4)")


def qp_scale_extreme(rng, draw):
    """Objective by s and constraints by t in 1e+-150: a finite, right y (checked relatively) or a typed error."""
    Q, q, G, h = _qp(rng)
    s, t = _pick(draw, EXTREME, "objective scale"), _pick(draw, EXTREME, "row scale")
    fn = lambda Q, q, G, h: rl.qp_layer(s * Q, s * q, t * G, t * h)
    return case(lambda: fn(Q, q, G, h), grad=lambda y: grad_check(fn, Q, q, G, h, noise=QP_NOISE),
                describe=f"qp_layer objective*{s:g}, rows*{t:g}")


def qp_empty(rng, draw):
    Q, q, G, h = _qp(rng)
    n = Q.shape[0]
    kind = _pick(draw, ("m=0", "G=None", "n=0", "empty-batch"), "kind")
    A, b = rng.standard_normal((1, n)), rng.standard_normal(1)
    if kind == "m=0":
        args = (Q, q, np.zeros((0, n)), np.zeros(0), A, b)
    elif kind == "G=None":
        args = (Q, q, None, None, A, b)
    elif kind == "n=0":
        args = (np.zeros((0, 0)), np.zeros(0), np.zeros((2, 0)), np.ones(2))
    else:
        args = (np.zeros((0, n, n)), np.zeros((0, n)), G, h)
    float_args = [a for a in args if a is not None]
    grad = None if kind in ("n=0", "empty-batch") else (
        lambda y: grad_check(lambda Q, q, A, b: rl.qp_layer(Q, q, *args[2:4], A, b), Q, q, A, b,
                             noise=QP_NOISE))
    return case(lambda: rl.qp_layer(*args), grad=grad, words=("empty", "0", "size", "shape"),
                describe=f"qp_layer {kind} ({len(float_args)} arrays)")


def qp_infeasible(rng, draw):
    Q, q, G, h = _qp(rng)
    G2 = np.vstack([G, G[:1], -G[:1]])
    h2 = np.concatenate([h, [-1.0 + h[0] * 0], [-1.0]])     # g y <= -1 and -g y <= -1
    return case(lambda: rl.qp_layer(Q, q, G2, h2), must_raise=True, words=("infeasib",),
                describe="qp_layer with contradicting rows g y <= -1, -g y <= -1")


def qp_unbounded(rng, draw):
    n = 3
    kind = _pick(draw, ("unbounded-lp", "non-convex"), "kind")
    Q = np.zeros((n, n)) if kind == "unbounded-lp" else np.diag([1.0, -1.0, 1.0])
    q = np.array([1.0, 1.0, 1.0])
    G, h = np.array([[1.0, 0, 0]]), np.array([1.0])
    words = ("unbounded", "below") if kind == "unbounded-lp" else ("convex", "semidefinite", "indefinite")
    return case(lambda: rl.qp_layer(Q, q, G, h), must_raise=True, words=words,
                describe=f"qp_layer {kind}")


def qp_degenerate(rng, draw):
    """Duplicated active constraint rows: a genuinely degenerate, documented min-norm case."""
    Q, q, G, h = _qp(rng)
    G2, h2 = np.vstack([G, G]), np.concatenate([h, h])
    return case(lambda: rl.qp_layer(Q, q, G2, h2), describe="qp_layer with every row twice")


def qp_mixed_batch(rng, draw):
    B = 3
    inst = [_qp(rng) for _ in range(B)]
    Q, q, G, h = (np.stack([x[k] for x in inst]) for k in range(4))
    bad = _int(draw, 0, B - 1, "bad instance")
    kind = _pick(draw, ("nan", "infeasible"), "kind")
    if kind == "nan":
        q[bad, 0] = np.nan
        words = NONFINITE_WORDS
    else:
        G[bad, 1], h[bad, 1] = -G[bad, 0], -h[bad, 0] - 1.0
        words = ("infeasib",)
    return case(lambda: rl.qp_layer(Q, q, G, h), must_raise=True, words=words,
                describe=f"batched qp_layer, instance {bad} {kind}")


def qp_options(rng, draw):
    args = _qp(rng)
    opts = _pick(draw, ({"backward": "bogus"}, {"tol": float("nan")}, {"tol": -1.0},
                        {"max_iter": -1}, {"weak_tol": float("nan")}, {"residual_tol": float("nan")},
                        {"accept_residual": -1.0}, {"solver_options": {"bogus": 1}}), "options")
    return _options_case(lambda **o: rl.qp_layer(*args, **o), opts)


QP = {"nan-inf": qp_nonfinite, "dtype": qp_dtype, "layout": qp_layout, "scale": qp_scale,
      "scale-extreme": qp_scale_extreme,
      "empty": qp_empty, "infeasible": qp_infeasible, "unbounded/non-convex": qp_unbounded,
      "degenerate": qp_degenerate, "mixed-batch": qp_mixed_batch, "options": qp_options}
def _warm_qp():
    rng = np.random.default_rng(0)
    args = _qp(rng)
    grad_check(lambda *a: rl.qp_layer(*a), *args, noise=QP_NOISE)
    grad_check(lambda *a: rl.qp_layer(*a, backward="generic"), *args, noise=QP_NOISE)
    for how in sorted(LAYOUTS):                   # numba compiles one specialization per layout
        grad_check(lambda *a: rl.qp_layer(*a), *[LAYOUTS[how](a) for a in args], noise=QP_NOISE)
    rl.qp_layer(np.zeros((0,) + args[0].shape), np.zeros((0,) + args[1].shape), *args[2:])
    try:                                          # the equality-only kernels (may raise: a defect)
        Q, q = args[:2]
        rl.qp_layer(Q, q, np.zeros((0, Q.shape[0])), np.zeros(0), np.ones((1, Q.shape[0])), np.ones(1))
    except Exception:                             # noqa: BLE001 - counted by the example itself
        pass


test_qp_layer, test_qp_layer_slow = hostile_tests("qp_layer", QP, warm_up=_warm_qp)


# ------------------------------------------------------------------------------
# ncut_layer
# ------------------------------------------------------------------------------

def _affinity(rng, n=6):
    from verification.strategies.ncut import block_affinity
    return block_affinity(rng, n=n)


def _ncut(W, **kw):
    return rl.ncut_layer(_sym(W), **kw)


def nc_nonfinite(rng, draw):
    W = _affinity(rng)
    i, j = _int(draw, 0, 5, "i"), _int(draw, 0, 5, "j")
    value = _pick(draw, NONFINITE, "value")
    W[i, j] = W[j, i] = value
    return case(lambda: rl.ncut_layer(W), words=NONFINITE_WORDS, describe=f"ncut_layer W[{i},{j}]={value}")


def nc_dtype(rng, draw):
    dtype = _pick(draw, BAD_DTYPES, "dtype")
    W = as_dtype(_affinity(rng), dtype)
    grad = (lambda out: grad_check(_ncut, np.asarray(W, float))) if dtype in ("float32", "float16") else None
    return case(lambda: rl.ncut_layer(W), grad=grad, must_raise=(dtype == "complex128"),
                describe=f"ncut_layer W as {dtype}")


def nc_layout(rng, draw):
    how = _pick(draw, sorted(LAYOUTS), "layout")
    W = LAYOUTS[how](_affinity(rng))
    return case(lambda: rl.ncut_layer(W), grad=lambda out: grad_check(_ncut, W), must_succeed=True,
                describe=f"ncut_layer {how} W")


def nc_scale(rng, draw):
    s = _pick(draw, EXTREME, "scale")
    W = _affinity(rng)
    fn = rescaled(_ncut, (s,), 1.0)
    return case(lambda: rl.ncut_layer(s * W), grad=lambda out: grad_check(fn, W), must_succeed=True,
                describe=f"ncut_layer W*{s:g}")


def nc_shapes(rng, draw):
    kind = _pick(draw, ("0x0", "1x1", "2x2", "3x3", "non-square", "empty-batch", "sparse"), "kind")
    if kind == "sparse":
        import scipy.sparse as sp
        W = sp.csr_matrix(_affinity(rng))
        return case(lambda: rl.ncut_layer(W), words=("sparse", "edges"),
                    describe="ncut_layer with a scipy.sparse W")
    W = {"0x0": np.zeros((0, 0)), "1x1": np.ones((1, 1)), "2x2": np.ones((2, 2)),
         "3x3": 0.5 + 0.5 * np.eye(3) + rng.uniform(0, 0.1, (3, 3)), "non-square": np.ones((3, 4)),
         "empty-batch": np.zeros((0, 5, 5))}[kind]
    grad = (lambda out: grad_check(_ncut, W)) if kind == "3x3" else None
    return case(lambda: rl.ncut_layer(W), grad=grad, words=("shape", "size", "N", "nodes", "square", "empty"),
                describe=f"ncut_layer W {kind}")


def nc_degenerate(rng, draw):
    kind = _pick(draw, ("disconnected-3", "uniform", "negative", "asymmetric", "zero-row"), "kind")
    n = 6
    if kind == "disconnected-3":
        W = np.zeros((n, n))
        for blk in (slice(0, 2), slice(2, 4), slice(4, 6)):
            W[blk, blk] = 1.0
    elif kind == "uniform":
        W = np.ones((n, n))
    elif kind == "negative":
        W = _affinity(rng, n)
        W[0, 1] = W[1, 0] = -1.0
    elif kind == "asymmetric":
        W = _affinity(rng, n)
        W[0, 1] += 0.5
    else:
        W = _affinity(rng, n)
        W[0, :] = W[:, 0] = 0.0
    return case(lambda: rl.ncut_layer(W), must_raise=True,
                words=("degenerate", "eigen", "gap", "symmetric", "negative", "isolated", "degree",
                       "connected", "zero"),
                describe=f"ncut_layer {kind} affinity")


def nc_options(rng, draw):
    W = _affinity(rng)
    opts = _pick(draw, ({"normalization": "bogus"}, {"gap_tol": float("nan")}, {"gap_tol": -1.0},
                        {"linear_solver": "bogus"}, {"n_nodes": -2}, {"bogus_option": 1},
                        {"gap_tol": "small"}, {"full_output": "yes"}, {"dense_max": -1},
                        {"n_nodes": 2.5}, {"sign_reference": np.zeros(6)},
                        {"sign_reference": np.full(6, np.nan)}, {"solver_options": {"eig_tol": 1e-9}},
                        {"normalization": None}, {"backward": "structured"}), "options")
    return _options_case(lambda **o: rl.ncut_layer(W, **o), opts)


def nc_mixed_batch(rng, draw):
    """A batch whose instance ``bad`` has three components (a degenerate second eigenvalue)."""
    B, n = 3, 6
    W = np.stack([_affinity(rng, n) for _ in range(B)])
    bad = _int(draw, 0, B - 1, "bad instance")
    W[bad] = 0.0
    for blk in (slice(0, 2), slice(2, 4), slice(4, 6)):
        W[bad, blk, blk] = 1.0
    return case(lambda: rl.ncut_layer(W), must_raise=True, words=("instance",),
                describe=f"batched ncut_layer, instance {bad} degenerate")


NCUT = {"nan-inf": nc_nonfinite, "mixed-batch": nc_mixed_batch, "dtype": nc_dtype, "layout": nc_layout, "scale": nc_scale,
        "shapes": nc_shapes, "degenerate": nc_degenerate, "options": nc_options}
test_ncut_layer, test_ncut_layer_slow = hostile_tests(
    "ncut_layer", NCUT,
    warm_up=lambda: grad_check(_ncut, _affinity(np.random.default_rng(0))))


# ------------------------------------------------------------------------------
# iso_surface_layer
# ------------------------------------------------------------------------------

def _field(rng, n=6):
    from verification.strategies.level_set import field
    return field(rng, "sphere", n=n)


def _verts(phi, level):
    return rl.iso_surface_layer(phi, level)[0]


def iso_nonfinite(rng, draw):
    phi, level = _field(rng)
    which = _pick(draw, ("phi", "level"), "which")
    value = _pick(draw, NONFINITE, "value")
    if which == "phi":
        phi = put_nonfinite(phi, _int(draw, 0, phi.size - 1, "index"), value)
    else:
        level = value
    return case(lambda: rl.iso_surface_layer(phi, level), words=NONFINITE_WORDS,
                describe=f"iso_surface_layer {value} in {which}")


def iso_dtype(rng, draw):
    phi, level = _field(rng)
    dtype = _pick(draw, BAD_DTYPES, "dtype")
    phi2 = as_dtype(phi, dtype)
    grad = (lambda out: grad_check(_verts, np.asarray(phi2, float), level)) \
        if dtype in ("float32",) else None
    return case(lambda: rl.iso_surface_layer(phi2, level), grad=grad, must_raise=(dtype == "complex128"),
                describe=f"iso_surface_layer phi as {dtype}")


def iso_layout(rng, draw):
    phi, level = _field(rng)
    how = _pick(draw, sorted(LAYOUTS), "layout")
    phi = LAYOUTS[how](phi)
    return case(lambda: rl.iso_surface_layer(phi, level), grad=lambda out: grad_check(_verts, phi, level),
                must_succeed=True, describe=f"iso_surface_layer {how} phi")


def iso_scale(rng, draw):
    phi, level = _field(rng)
    s = _pick(draw, EXTREME, "scale")
    fn = rescaled(_verts, (s, s), 1.0)
    return case(lambda: rl.iso_surface_layer(s * phi, s * level), grad=lambda out: grad_check(fn, phi, level),
                must_succeed=True, describe=f"iso_surface_layer phi, level * {s:g}")


def _finite_vjp(phi, level) -> bool:
    from autograd import grad
    g = grad(lambda p, l: anp.sum(_verts(p, l) ** 2), (0, 1))(phi, level)
    return bool(np.all(np.isfinite(g[0])) and np.isfinite(g[1]))


def iso_shapes(rng, draw):
    kind = _pick(draw, ("0x0x0", "1-point-axis", "2-d", "no-crossing", "level-on-grid", "constant"), "kind")
    phi, level = _field(rng)
    if kind == "0x0x0":
        phi = np.zeros((0, 0, 0))
    elif kind == "1-point-axis":
        phi = phi[:1]
    elif kind == "2-d":
        phi = phi[0]
    elif kind == "no-crossing":
        level = float(phi.max()) + 1.0
    elif kind == "level-on-grid":
        level = float(np.sort(phi.ravel())[phi.size // 3])
    else:
        phi, level = np.zeros((4, 4, 4)), 0.0
    # at a level on grid values the mesh's topology changes under any perturbation, so
    # finite differences of verts are undefined: the documented result must have a finite VJP
    grad = (lambda out: _finite_vjp(phi, level)) if kind == "level-on-grid" else None
    return case(lambda: rl.iso_surface_layer(phi, level), grad=grad,
                words=("shape", "axis", "points", "surface", "empty", "level", "degenerate", "crossing",
                       "triangle", "grid"),
                describe=f"iso_surface_layer {kind}")


def iso_options(rng, draw):
    phi, level = _field(rng)
    opts = _pick(draw, ({"mode": "bogus"}, {"spacing": (1.0, -1.0, 1.0)}, {"spacing": (1.0, np.nan, 1.0)},
                        {"spacing": (1.0, 1.0)}, {"linear_solver": "bogus"}), "options")
    return _options_case(lambda **o: rl.iso_surface_layer(phi, level, **o), opts)


ISO = {"nan-inf": iso_nonfinite, "dtype": iso_dtype, "layout": iso_layout, "scale": iso_scale,
       "shapes/degenerate": iso_shapes, "options": iso_options}
def _warm_iso():
    phi, level = _field(np.random.default_rng(0))
    grad_check(_verts, phi, level)
    grad_check(_verts, np.asfortranarray(phi), level)
    grad_check(_verts, phi.astype(np.float32).astype(float), level)


test_iso_surface_layer, test_iso_surface_layer_slow = hostile_tests("iso_surface_layer", ISO,
                                                                    warm_up=_warm_iso)


# ------------------------------------------------------------------------------
# graph matching: spectral_matching_layer, smac_layer, power_iteration_layer, sinkhorn_layer
# ------------------------------------------------------------------------------

def _M(rng, N=6):
    X = rng.uniform(-1.0, 1.0, (N, N))
    return np.exp(_sym(X))


def _matching_cases(name, call, has_options, extra=None, N=6):
    """The classes shared by the three affinity layers; ``call(M, **options)``."""
    sym_call = lambda M: call(_sym(M))
    MN = lambda rng: _M(rng, N)

    def nonfinite(rng, draw):
        M = MN(rng)
        i, j, value = _int(draw, 0, N - 1, "i"), _int(draw, 0, N - 1, "j"), _pick(draw, NONFINITE, "value")
        M[i, j] = M[j, i] = value
        return case(lambda: call(M), words=NONFINITE_WORDS, describe=f"{name} M[{i},{j}]={value}")

    def dtype(rng, draw):
        d = _pick(draw, BAD_DTYPES, "dtype")
        M = as_dtype(MN(rng), d)
        grad = (lambda out: grad_check(sym_call, np.asarray(M, float))) if d in ("float32", "float16") else None
        return case(lambda: call(M), grad=grad, must_raise=(d == "complex128"),
                describe=f"{name} M as {d}")

    def layout(rng, draw):
        how = _pick(draw, sorted(LAYOUTS), "layout")
        M = LAYOUTS[how](MN(rng))
        return case(lambda: call(M), grad=lambda out: grad_check(sym_call, M), must_succeed=True,
                    describe=f"{name} {how} M")

    def scale(rng, draw):
        s = _pick(draw, EXTREME + (1e5,), "scale")
        M = MN(rng)
        return case(lambda: call(s * M), grad=lambda out: grad_check(rescaled(sym_call, (s,), 1.0), M),
                    must_succeed=True, describe=f"{name} M*{s:g}")

    def shapes(rng, draw):
        kind = _pick(draw, ("0x0", "1x1", "non-square", "empty-batch", "3-d-mixed"), "kind")
        if kind == "3-d-mixed":
            M = np.stack([MN(rng), MN(rng)])
            M[1, 0, 0] = np.nan
            # a typed error naming the bad instance, or the shape for a layer without batches
            return case(lambda: call(M), must_raise=True, words=("instance", "shape") + NONFINITE_WORDS,
                        describe=f"{name} batch with a NaN instance")
        M = {"0x0": np.zeros((0, 0)), "1x1": np.ones((1, 1)), "non-square": np.ones((3, 4)),
             "empty-batch": np.zeros((0, 4, 4))}[kind]
        grad = (lambda out: grad_check(sym_call, M)) if kind == "1x1" else None
        return case(lambda: call(M), grad=grad, words=("shape", "size", "square", "empty", "entries",
                                                       "rank", "unknowns"),
                    describe=f"{name} M {kind}")

    def degenerate(rng, draw):
        kind = _pick(draw, ("identity", "zero", "asymmetric", "negative"), "kind")
        M = {"identity": np.eye(N), "zero": np.zeros((N, N))}.get(kind)
        if kind == "asymmetric":
            M = MN(rng)
            M[0, 1] += 1.0
        elif kind == "negative":
            M = MN(rng)
            M[0, 1] = M[1, 0] = -5.0
        return case(lambda: call(M), grad=lambda out: grad_check(sym_call, M),
                    words=("degenerate", "eigen", "gap", "symmetric", "negative", "zero", "nonneg"),
                    describe=f"{name} {kind} M")

    cases = {"nan-inf": nonfinite, "dtype": dtype, "layout": layout, "scale": scale,
             "shapes": shapes, "degenerate": degenerate}
    if has_options:
        def options(rng, draw):
            M = MN(rng)
            opts = _pick(draw, has_options, "options")
            return _options_case(lambda **o: call(M, **o), opts)
        cases["options"] = options
    cases.update(extra or {})
    return cases


_EIG_OPTIONS = ({"backward": "bogus"}, {"solver_options": {"eig_method": "bogus"}},
                {"solver_options": {"bogus": 1}}, {"gap_tol": float("nan")}, {"dense_max": -1},
                {"residual_tol": float("nan")}, {"linear_solver": "bogus", "backward": "generic"})

SM = _matching_cases("spectral_matching_layer", lambda M, **o: rl.spectral_matching_layer(M, **o), _EIG_OPTIONS)
test_spectral_matching_layer, test_spectral_matching_layer_slow = hostile_tests(
    "spectral_matching_layer", SM, warm_up=lambda: _warm_matching())


def _one_to_one(n):
    """Row and column sums of an n x n assignment: rank 2n - 1 (defect 6)."""
    C = np.zeros((2 * n, n * n))
    for i in range(n):
        C[i, i * n:(i + 1) * n] = 1.0
        C[n + i, i::n] = 1.0
    return C, np.ones(2 * n)


def smac_constraints(rng, draw):
    n = 3
    kind = _pick(draw, ("one-to-one", "infeasible", "d=0", "C-0-rows", "C-nan", "C-wrong-shape"), "kind")
    M = _M(rng, n * n)
    C, d = _one_to_one(n)
    if kind == "one-to-one":
        fn = lambda M: rl.smac_layer(_sym(M), C, d)
        return case(lambda: fn(M), grad=lambda out: grad_check(fn, M), must_succeed=True,
                    describe="smac one-to-one C (rank 2n-1)")
    if kind == "infeasible":
        d = d.copy()
        d[0] = 5.0                                  # row sums total 7 != column sums total 3
        return case(lambda: rl.smac_layer(M, C, d), must_raise=True, words=("infeasib", "inconsistent", "consisten"),
                    describe="smac with inconsistent C y = d")
    if kind == "d=0":
        C1 = rng.uniform(0.5, 1.5, (2, n * n))
        fn = lambda M: rl.smac_layer(_sym(M), C1, np.zeros(2))
        return case(lambda: fn(M), grad=lambda out: grad_check(fn, M), words=("sign", "d = 0", "d=0", "zero"),
                    describe="smac with d = 0")
    if kind == "C-0-rows":
        return case(lambda: rl.smac_layer(M, np.zeros((0, n * n)), np.zeros(0)),
                    grad=lambda out: grad_check(lambda M: rl.smac_layer(_sym(M), np.zeros((0, n * n)), np.zeros(0)), M),
                    words=("rows", "constraint", "empty", "0"), describe="smac with C of 0 rows")
    if kind == "C-nan":
        C = C.copy()
        C[0, 0] = np.nan
        return case(lambda: rl.smac_layer(M, C, d), words=NONFINITE_WORDS, describe="smac with NaN in C")
    return case(lambda: rl.smac_layer(M, C[:, :-1], d), words=("shape", "columns", "size"),
                describe="smac with C of the wrong width")


SMAC = _matching_cases("smac_layer", lambda M, **o: rl.smac_layer(M, **o), _EIG_OPTIONS,
                       {"constraints": smac_constraints}, N=9)


def _warm_matching():
    M = _M(np.random.default_rng(0), 9)
    for layer in (rl.spectral_matching_layer, rl.smac_layer, rl.power_iteration_layer):
        grad_check(lambda M: layer(_sym(M)), M)


test_smac_layer, test_smac_layer_slow = hostile_tests("smac_layer", SMAC, warm_up=_warm_matching)

PI = _matching_cases("power_iteration_layer", lambda M, **o: rl.power_iteration_layer(M, **o),
                     ({"iterations": -1}, {"iterations": 0}, {"iterations": 2.5}, {"iterations": "ten"}))
test_power_iteration_layer, test_power_iteration_layer_slow = hostile_tests("power_iteration_layer", PI)


# sinkhorn: scores S (n, m), any real values; marginals positive

def _sk(S, **kw):
    return rl.sinkhorn_layer(S, tau=0.8, **kw)


def sk_nonfinite(rng, draw):
    S = put_nonfinite(rng.uniform(-1, 1, (3, 4)), _int(draw, 0, 11, "index"), _pick(draw, NONFINITE, "value"))
    return case(lambda: _sk(S), words=NONFINITE_WORDS, describe="sinkhorn with a non-finite score")


def sk_dtype(rng, draw):
    d = _pick(draw, BAD_DTYPES, "dtype")
    S = as_dtype(rng.uniform(-1, 1, (3, 4)), d)
    grad = (lambda out: grad_check(_sk, np.asarray(S, float))) if d in ("float32", "float16", "int64") else None
    return case(lambda: _sk(S), grad=grad, must_raise=(d == "complex128"),
                describe=f"sinkhorn S as {d}")


def sk_layout(rng, draw):
    how = _pick(draw, sorted(LAYOUTS), "layout")
    S = LAYOUTS[how](rng.uniform(-1, 1, (3, 4)))
    return case(lambda: _sk(S), grad=lambda out: grad_check(_sk, S), must_succeed=True,
                describe=f"sinkhorn {how} S")


def sk_scale(rng, draw):
    """S scaled by s with tau scaled by s: the same plan.  S alone at 1e150: typed error or finite."""
    s = _pick(draw, EXTREME, "scale")
    S = rng.uniform(-1, 1, (3, 4))
    together = _pick(draw, (True, False), "tau scaled too")
    if together:
        fn = lambda S: rl.sinkhorn_layer(s * S, tau=0.8 * s)
        return case(lambda: fn(S), grad=lambda out: grad_check(fn, S), must_succeed=True,
                    describe=f"sinkhorn S*{s:g}, tau*{s:g}")
    return case(lambda: _sk(s * S), describe=f"sinkhorn S*{s:g}")


def sk_shapes(rng, draw):
    kind = _pick(draw, ("0x0", "0-rows", "1x1", "1-d", "empty-batch"), "kind")
    S = {"0x0": np.zeros((0, 0)), "0-rows": np.zeros((0, 3)), "1x1": np.ones((1, 1)),
         "1-d": np.ones(4), "empty-batch": np.zeros((0, 3, 3))}[kind]
    return case(lambda: _sk(S), words=("shape", "size", "empty", "dimension", "2-d", "rows"),
                describe=f"sinkhorn S {kind}")


def sk_marginals(rng, draw):
    S = rng.uniform(-1, 1, (3, 4))
    kind = _pick(draw, ("unbalanced", "negative", "zero", "nan", "wrong-length"), "kind")
    r, c = np.ones(3) / 3, np.ones(4) / 4
    if kind == "unbalanced":
        r = r * 2
    elif kind == "negative":
        r = np.array([0.5, 0.6, -0.1])
    elif kind == "zero":
        r = np.array([0.5, 0.5, 0.0])
    elif kind == "nan":
        c = c.copy()
        c[0] = np.nan
    else:
        r = np.ones(2) / 2
    return case(lambda: rl.sinkhorn_layer(S, 0.8, r, c), must_raise=True,
                words=("marginal", "sum", "positive", "finite", "shape", "length"),
                describe=f"sinkhorn {kind} marginals")


def sk_options(rng, draw):
    S = rng.uniform(-1, 1, (3, 4))
    opts = _pick(draw, ({"tau": 0.0}, {"tau": -1.0}, {"tau": float("nan")}, {"backward": "bogus"},
                        {"solver_options": {"bogus": 1}}, {"solver_options": {"tol": float("nan")}},
                        {"solver_options": {"max_iter": -1}}), "options")
    return _options_case(lambda **o: rl.sinkhorn_layer(S, **o), opts)


SINKHORN = {"nan-inf": sk_nonfinite, "dtype": sk_dtype, "layout": sk_layout, "scale": sk_scale,
            "shapes": sk_shapes, "marginals": sk_marginals, "options": sk_options}
test_sinkhorn_layer, test_sinkhorn_layer_slow = hostile_tests("sinkhorn_layer", SINKHORN)
