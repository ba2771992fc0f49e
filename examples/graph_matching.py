"""Learning graph-matching affinities end to end (the paper's Fig. 9).

Branches: power iteration with k = 5, 10, 20 steps (unrolled), spectral
matching (SM, implicit) and SMAC (implicit, one-to-one affine constraints).
Each branch learns the same affinity parameters from the same initialization:

- a node map ``W`` (features -> 4-d embedding) and a node-term scale, giving
  ``K_p = exp(beta) exp(-|W'f1 - W'f2|^2)``;
- log-weights of a Gaussian kernel on edge features (length, cos, sin).

Pipeline per instance: ``M = gaussian_affinity(K_p, P1, P2, w)`` -> branch ->
scores ``X`` (``n x n``, normalized to Frobenius norm ``sqrt(n)``) -> voting
layer (row softmax, temperature 0.1) -> cross-entropy on the inlier rows.
Accuracy: Hungarian discretization of ``X``, fraction of inliers matched correctly.

Parts
1. synthetic keypoints (verification.strategies.graph_matching.synthetic_pair):
   learning curves (test accuracy vs iteration) and final accuracy vs noise;
2. real images: scikit-image's stereo pair (``stereo_motorcycle``) with its
   disparity map as ground truth; patch descriptors through the learnable map;
   PCK at alpha = 0.1 (skipped with a message without scikit-image);
3. pygmtools' sm, rrwm and ipfp (solver only) on the synthetic test instances
   with the affinity learned by the SM branch (skipped without pygmtools).

Run:  PYTHONPATH=. python examples/graph_matching.py [--quick]
Plots go to examples/output/ (matplotlib optional); numbers to stdout and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# One BLAS thread unless the caller chose otherwise: on a small shared machine
# OpenBLAS's threads oversubscribe the cores and a 100 x 100 eigh can take 100x longer.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import autograd.numpy as np
import numpy as onp
from autograd import value_and_grad

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from nimplicit import nn  # noqa: E402
from reference_layers import graph_matching as gm  # noqa: E402
from verification.strategies.graph_matching import mixing_matrix, synthetic_pair  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "output")
BRANCHES = ["PI-5", "PI-10", "PI-20", "SM", "SMAC"]
EMBED = 4
TEMPERATURE = 0.1
# initial kernel: narrow edge kernel and a strong node term, a regime where the
# affinity's eigen-gap is small (lam2/lam1 ~ 0.8) and k power iterations differ from SM
INIT_LOG_W = 2.5
INIT_LOG_NODE = 1.0


# ------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------

def init_params(rng, feature_dim: int) -> dict:
    return {"W": 0.1 * rng.standard_normal((feature_dim, EMBED)),
            "log_node": onp.array(INIT_LOG_NODE), "log_w": onp.full(3, INIT_LOG_W)}


def affinity(params, inst):
    Kp = np.exp(params["log_node"]) * gm.node_affinity(inst["F1"], inst["F2"], params["W"])
    return gm.gaussian_affinity(Kp, inst["P1"], inst["P2"], np.exp(params["log_w"]),
                                inst["E1"], inst["E2"])


def branch_scores(branch: str, M, n: int):
    """The relaxed assignment ``X`` (n x n) of one branch."""
    if branch.startswith("PI-"):
        y = gm.power_iteration_layer(M, iterations=int(branch[3:]))
    elif branch == "SM":
        y = gm.spectral_matching_layer(M)
    elif branch == "SMAC":
        y = gm.smac_layer(M, shape=(n, n))
    else:
        raise ValueError(branch)
    return np.reshape(y, (n, n))


def instance_loss(params, inst, branch):
    n = inst["X_true"].shape[0]
    X = branch_scores(branch, affinity(params, inst), n)
    X = X * onp.sqrt(n) / np.sqrt(np.sum(X * X))
    V = gm.voting_layer(X, TEMPERATURE)
    rows = inst["inliers1"]
    return -np.sum(inst["X_true"][rows] * np.log(V[rows] + 1e-12)) / rows.sum()


def batch_loss(params, batch, branch):
    return sum(instance_loss(params, inst, branch) for inst in batch) / len(batch)


def predict(params, inst, branch) -> onp.ndarray:
    n = inst["X_true"].shape[0]
    return gm.hungarian(branch_scores(branch, affinity(params, inst), n))


def accuracy(params, instances, branch) -> float:
    return float(onp.mean([gm.matching_accuracy(predict(params, inst, branch), inst["X_true"])
                           for inst in instances]))


def train(branch, params, sample_batch, evaluate, iterations, lr, eval_every):
    objective = value_and_grad(batch_loss)
    state = None
    curve = [(0, evaluate(params, branch))]
    seconds = 0.0
    for it in range(1, iterations + 1):
        batch = sample_batch(it)
        t0 = time.perf_counter()
        loss, g = objective(params, batch, branch)
        params, state = nn.adam(params, g, lr=lr, state=state)
        seconds += time.perf_counter() - t0
        if it % eval_every == 0 or it == iterations:
            curve.append((it, evaluate(params, branch)))
    return params, curve, seconds / iterations


# ------------------------------------------------------------------------------
# part 1: synthetic keypoints
# ------------------------------------------------------------------------------

def synthetic_experiment(args, results):
    rng = onp.random.default_rng(args.seed)
    Q = mixing_matrix(rng, 16)
    cfg = dict(n=args.inliers, outliers=args.outliers, mixing=Q)
    test = [synthetic_pair(rng, noise=args.noise, **cfg) for _ in range(args.test_size)]
    train_rng = onp.random.default_rng(args.seed + 1)
    pool = [[synthetic_pair(train_rng, noise=args.noise, **cfg) for _ in range(args.batch)]
            for _ in range(args.iterations)]
    init = init_params(onp.random.default_rng(args.seed + 2), 16)
    evaluate = lambda p, b: accuracy(p, test, b)
    gradient_agreement(init, pool[0], results)
    trained, curves = {}, {}
    print(f"\n== synthetic: {args.inliers} inliers + {args.outliers} outliers, noise {args.noise}, "
          f"{args.iterations} iterations x batch {args.batch}, test {args.test_size} ==")
    for branch in BRANCHES:
        t0 = time.perf_counter()
        params, curve, per_it = train(branch, init, lambda it: pool[it - 1], evaluate,
                                      args.iterations, args.lr, args.eval_every)
        trained[branch], curves[branch] = params, curve
        print(f"{branch:>6}: accuracy " + " ".join(f"{a:.3f}@{i}" for i, a in curve)
              + f"   ({per_it * 1e3:.1f} ms/iteration, {time.perf_counter() - t0:.1f} s total)")
        results.setdefault("synthetic_curves", {})[branch] = curve
        results.setdefault("train_ms_per_iteration", {})[branch] = per_it * 1e3
    # iterations to reach 90% of the best final accuracy: a convergence-speed summary
    best = max(c[-1][1] for c in curves.values())
    for branch, curve in curves.items():
        hit = next((i for i, a in curve if a >= 0.9 * best), None)
        results.setdefault("iterations_to_90pct_of_best", {})[branch] = hit
    print("iterations to reach 90% of the best final accuracy:",
          results["iterations_to_90pct_of_best"])

    print("\nfinal accuracy vs deformation noise (trained parameters, fresh test sets):")
    sweep_rng = onp.random.default_rng(args.seed + 3)
    noise_table = {}
    for noise in args.noise_levels:
        insts = [synthetic_pair(sweep_rng, noise=noise, **cfg) for _ in range(args.test_size)]
        noise_table[noise] = {b: accuracy(trained[b], insts, b) for b in BRANCHES}
        print(f"  noise {noise:.3f}: "
              + "  ".join(f"{b} {a:.3f}" for b, a in noise_table[noise].items()))
    results["accuracy_vs_noise"] = {str(k): v for k, v in noise_table.items()}
    plot_synthetic(curves, noise_table)
    return trained, test


def _flat(tree):
    return onp.concatenate([onp.ravel(tree[k]) for k in sorted(tree)])


def gradient_agreement(params, batch, results):
    """At the initial parameters: eigen-gap of the affinities and the cosine between each
    branch's gradient and SM's (the exact gradient of the converged eigenvector)."""
    ratios = []
    for inst in batch:
        w = onp.linalg.eigvalsh(onp.asarray(affinity(params, inst)))
        ratios.append(w[-2] / w[-1])
    from autograd import grad
    g = {b: _flat(grad(batch_loss)(params, batch, b)) for b in BRANCHES}
    cos = {b: float(g[b] @ g["SM"] / (onp.linalg.norm(g[b]) * onp.linalg.norm(g["SM"])))
           for b in BRANCHES}
    results["initial_lam2_over_lam1"] = float(onp.mean(ratios))
    results["initial_gradient_cosine_to_SM"] = cos
    print(f"at initialization: mean lam2/lam1 = {onp.mean(ratios):.3f}; cosine of each branch's "
          f"gradient with SM's: " + ", ".join(f"{b} {c:.4f}" for b, c in cos.items()))


def plot_synthetic(curves, noise_table):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plots)")
        return
    os.makedirs(OUT, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for branch, curve in curves.items():
        it, acc = zip(*curve)
        axes[0].plot(it, acc, marker="o", ms=3, label=branch)
    axes[0].set(xlabel="training iteration", ylabel="matching accuracy (test)",
                title="learning curves")
    axes[0].legend()
    levels = sorted(noise_table)
    for branch in BRANCHES:
        axes[1].plot(levels, [noise_table[l][branch] for l in levels], marker="o", label=branch)
    axes[1].set(xlabel="deformation noise sigma", ylabel="final accuracy", title="robustness")
    axes[1].legend()
    fig.tight_layout()
    path = os.path.join(OUT, "graph_matching_synthetic.png")
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


# ------------------------------------------------------------------------------
# part 2: real images (scikit-image stereo pair)
# ------------------------------------------------------------------------------

PATCH = 5   # half-width of the descriptor patch


def _descriptor(gray, x, y):
    p = gray[y - PATCH:y + PATCH + 1, x - PATCH:x + PATCH + 1].ravel()
    p = p - p.mean()
    return p / (onp.linalg.norm(p) + 1e-8)


def stereo_keypoints(max_points: int):
    from skimage import data
    from skimage.color import rgb2gray
    from skimage.feature import corner_harris, corner_peaks
    left, right, disp = data.stereo_motorcycle()
    gl, gr = rgb2gray(left), rgb2gray(right)
    H, Wd = gl.shape
    peaks = corner_peaks(corner_harris(gl), min_distance=12, threshold_rel=0.01)
    kept = []
    for y, x in peaks:
        d = disp[y, x]
        if not onp.isfinite(d):
            continue
        xr = int(round(x - d))
        if min(y, x, xr) < PATCH or y >= H - PATCH or max(x, xr) >= Wd - PATCH:
            continue
        kept.append((x, y, xr))
    kept = onp.array(kept[:max_points], float)
    pts_l, pts_r = kept[:, :2], onp.stack([kept[:, 2], kept[:, 1]], 1)
    f_l = onp.stack([_descriptor(gl, int(x), int(y)) for x, y in pts_l])
    f_r = onp.stack([_descriptor(gr, int(x), int(y)) for x, y in pts_r])
    return pts_l, pts_r, f_l, f_r, max(H, Wd)


def stereo_instance(rng, ids, n, outliers, pts_l, pts_r, f_l, f_r):
    """Graph 1: keypoints ids[:n] (inliers) and ids[n:n+o] seen only on the left;
    graph 2: the inliers' true right positions and ids[n+o:n+2o] seen only on the right."""
    left = onp.concatenate([ids[:n], ids[n:n + outliers]])
    right = onp.concatenate([ids[:n], ids[n + outliers:n + 2 * outliers]])
    N = len(left)
    perm = rng.permutation(N)
    right = right[perm]
    E = gm.full_edges(N)
    p1, p2 = pts_l[left], pts_r[right]
    X_true = onp.zeros((N, N))
    X_true[onp.arange(n), onp.argsort(perm)[:n]] = 1.0
    return {"F1": f_l[left], "F2": f_r[right], "E1": E, "E2": E,
            "P1": gm.edge_features(p1, E), "P2": gm.edge_features(p2, E),
            "X_true": X_true, "inliers1": onp.arange(N) < n, "points2": p2}


def pck(params, instances, branch, alpha=0.1) -> float:
    """Fraction of keypoints whose predicted match lies within alpha * (bounding-box
    size of the true keypoints in the right image) of the true location."""
    hits = []
    for inst in instances:
        rows = inst["inliers1"]
        P = predict(params, inst, branch)
        pred = inst["points2"][P.argmax(1)][rows]
        true = inst["points2"][inst["X_true"].argmax(1)][rows]
        size = (true.max(0) - true.min(0)).max()
        hits.extend(onp.linalg.norm(pred - true, axis=1) <= alpha * size)
    return float(onp.mean(hits))


def stereo_experiment(args, results):
    import importlib.util
    if importlib.util.find_spec("skimage") is None:
        print("\n== real images: skipped (scikit-image not installed; pip install scikit-image) ==")
        return
    pts_l, pts_r, f_l, f_r, _ = stereo_keypoints(max_points=120)
    rng = onp.random.default_rng(args.seed + 10)
    order = rng.permutation(len(pts_l))
    half = len(order) // 2
    train_ids, test_ids = order[:half], order[half:]
    n, o = args.stereo_nodes, args.stereo_outliers
    sample = lambda ids: stereo_instance(rng, rng.choice(ids, n + 2 * o, replace=False), n, o,
                                         pts_l, pts_r, f_l, f_r)
    test = [sample(test_ids) for _ in range(args.test_size)]
    pool = [[sample(train_ids) for _ in range(args.batch)] for _ in range(args.stereo_iterations)]
    init = init_params(onp.random.default_rng(args.seed + 11), f_l.shape[1])
    print(f"\n== real images: skimage stereo_motorcycle, {len(pts_l)} Harris keypoints with "
          f"disparity ground truth, graphs of {n} matched + {o} unmatched keypoints "
          f"(train/test keypoints disjoint), "
          f"{args.stereo_iterations} iterations ==")
    for branch in BRANCHES:
        params, curve, _ = train(branch, init, lambda it: pool[it - 1],
                                 lambda p, b: 0.0, args.stereo_iterations, args.lr,
                                 args.stereo_iterations)
        row = {"pck@0.1 before": pck(init, test, branch),
               "pck@0.1 after": pck(params, test, branch),
               "accuracy before": accuracy(init, test, branch),
               "accuracy after": accuracy(params, test, branch)}
        results.setdefault("stereo", {})[branch] = row
        print(f"{branch:>6}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))


# ------------------------------------------------------------------------------
# part 3: pygmtools solvers on the same instances
# ------------------------------------------------------------------------------

def pygmtools_comparison(args, results, params, test):
    try:
        import pygmtools as pygm
    except ImportError:
        print("\n== pygmtools: skipped (not installed; pip install pygmtools) ==")
        return
    pygm.set_backend("numpy")
    print("\n== solvers on the synthetic test instances, affinity learned by the SM branch ==")
    rows = {}
    Ms = [onp.asarray(affinity(params, inst)) for inst in test]
    for name in ["ours SM", "ours SMAC", "pygm sm", "pygm rrwm", "pygm ipfp"]:
        accs, secs = [], []
        for inst, M in zip(test, Ms):
            n = inst["X_true"].shape[0]
            t0 = time.perf_counter()
            if name == "ours SM":
                X = gm.spectral_matching_layer(M).reshape(n, n)
            elif name == "ours SMAC":
                X = gm.smac_layer(M).reshape(n, n)
            else:
                # pygmtools vectorizes column-major: index a * n + i for X[i, a]
                perm = (onp.arange(n)[None, :] * n + onp.arange(n)[:, None]).ravel()
                K = onp.empty_like(M)
                K[onp.ix_(perm, perm)] = M
                solver = getattr(pygm, name.split()[1])
                X = solver(K[None], onp.array([n]), onp.array([n]))[0]
            secs.append(time.perf_counter() - t0)
            accs.append(gm.matching_accuracy(gm.hungarian(X), inst["X_true"]))
        rows[name] = {"accuracy": float(onp.mean(accs)), "ms": 1e3 * float(onp.median(secs))}
        print(f"  {name:>10}: accuracy {rows[name]['accuracy']:.3f}, {rows[name]['ms']:.2f} ms "
              f"(median per instance, solver only)")
    results["solvers_on_learned_affinity"] = rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (about a minute)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-stereo", action="store_true")
    args = ap.parse_args(argv)
    q = args.quick
    args.inliers, args.outliers, args.noise = 10, 2, 0.05
    args.iterations = 30 if q else 150
    args.batch = 4
    args.test_size = 10 if q else 30
    args.eval_every = 5 if q else 10
    args.lr = 0.05
    args.noise_levels = [0.0, 0.05, 0.1] if q else [0.0, 0.025, 0.05, 0.075, 0.1, 0.15]
    args.stereo_nodes = 10
    args.stereo_outliers = 4
    args.stereo_iterations = 20 if q else 80
    results = {"config": {k: v for k, v in vars(args).items()}}
    t0 = time.perf_counter()
    trained, test = synthetic_experiment(args, results)
    if not args.no_stereo:
        stereo_experiment(args, results)
    pygmtools_comparison(args, results, trained["SM"], test)
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "graph_matching_results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=float)
    print(f"\nresults: {path}   total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
