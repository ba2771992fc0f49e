r"""Learning graph-matching affinities end to end: the paper's Fig. 7 pipeline and Fig. 9.

Pipeline per instance (Fig. 7, after GMN, Zanfir & Sminchisescu 2018)::

    M = gaussian_affinity(K_p, P1, P2, w)          (learned node map W, edge weights w)
    y = branch(M)       PI-k (k unrolled power iterations) | SM (implicit) | SMAC (implicit)
    X = reshape(y, (N, N)), scaled to Frobenius norm sqrt(N)
    S = sinkhorn_layer(X, tau)                      bi-stochastic layer (implicit fixed point)
    V = voting_layer(S, T)                          row softmax, temperature T
    d_i = sum_a V[i, a] p2_a - p1_i                 predicted displacement
    loss = mean over inlier rows of sqrt(|d_i - d*_i|^2 + 1e-6)   (displacement loss)

with ``K_p = exp(beta) exp(-|W'f1 - W'f2|^2)`` and a Gaussian kernel on the edge
features (length, cos, sin) with learned log-weights.  The three branches start
from the same initial weights and see the same batches.

Metric: PCK at ``alpha = 0.1``: a keypoint is correct when its predicted position
``p1_i + d_i`` is within ``alpha * sqrt(w^2 + h^2)`` of the truth, ``(w, h)`` the
bounding box of the second graph's keypoints; it is plotted against training
iterations (Fig. 9).  Also reported: the Hungarian matching accuracy.

Graphs: Delaunay triangulations (``scipy.spatial.Delaunay``, both directions of
each edge; the paper's choice) and fully connected graphs (``--graphs``).

Parts
1. synthetic keypoints (:func:`verification.strategies.graph_matching.synthetic_pair`):
   PCK vs iteration per branch and graph topology (``graph_matching-fig9.png``),
   final PCK vs deformation noise, and a Fig. 8-style picture (source, prediction,
   ground truth; ``graph_matching-fig8.png``);
2. real images: scikit-image's stereo pair (``stereo_motorcycle``, disparity as
   ground truth) with patch descriptors, PCK vs iteration; or CUB-200-2011 pairs of
   the same class from a local copy (``--cub PATH``, :func:`examples.datasets.load_cub`);
3. pygmtools' sm, rrwm and ipfp on the synthetic test instances (without pygmtools:
   skipped with a message).

A training step whose forward or backward raises a typed library error
(:class:`nimplicit.errors.NimplicitError`) is skipped and counted.

Run ``python -m examples.graph_matching [--quick]``; results in
``examples/results/graph_matching-<date>.json`` and its PNGs.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Dict, List

# One BLAS thread unless the caller chose otherwise: on a small shared machine
# OpenBLAS's threads oversubscribe the cores and a 100 x 100 eigh can take 100x longer.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import autograd.numpy as np  # noqa: E402
import numpy as onp  # noqa: E402
from autograd import grad, value_and_grad  # noqa: E402

from nimplicit import nn  # noqa: E402
from nimplicit.errors import NimplicitError  # noqa: E402
from reference_layers import graph_matching as gm  # noqa: E402
from verification.strategies.graph_matching import mixing_matrix, synthetic_pair  # noqa: E402

from examples._results import Results, SkipCounter, guarded_step, paper_table  # noqa: E402

BRANCHES = ["PI-5", "PI-10", "PI-20", "SM", "SMAC"]
EMBED = 4
SINKHORN_TAU = 1.0     # as GMN: Sinkhorn on the raw scores; the voting layer sharpens
VOTING_T = 0.02
ALPHA = 0.1
# initial kernel: narrow edge kernel and a strong node term, a regime where the
# affinity's eigen-gap is small (lam2/lam1 ~ 0.8) and k power iterations differ from SM
INIT_LOG_W = 2.5
INIT_LOG_NODE = 1.0
PAPER = {"fig9_ordering": "PI = k, SM, SMAC: the ordering of the PCK@0.1-vs-iterations "
                          "curves in Fig. 9 (read as: the implicit SM and SMAC layers above "
                          "unrolled power iteration)",
         "pipeline": "PI / SM / SMAC -> bi-stochastic -> voting -> displacement loss (Fig. 7)",
         "data": "CUB-200 image pairs"}
DIFFERENCES = [
    "data: synthetic keypoint pairs and scikit-image's stereo pair by default, not CUB-200 "
    "(pass --cub PATH for a local CUB-200-2011 copy)",
    "model: a learned linear node embedding (4-d) of given descriptors and 3 edge-kernel "
    "weights, not GMN's VGG features",
]


# ------------------------------------------------------------------------------
# graphs
# ------------------------------------------------------------------------------

def delaunay_edges(points) -> onp.ndarray:
    """Both directions of every edge of the Delaunay triangulation of ``points`` (``n x 2``);
    all pairs when the points are too few or degenerate (collinear) to triangulate."""
    from scipy.spatial import Delaunay
    from scipy.spatial import QhullError
    points = onp.asarray(points, float)
    if len(points) < 4:
        return gm.full_edges(len(points))
    try:
        tri = Delaunay(points)
    except QhullError:
        return gm.full_edges(len(points))
    pairs = set()
    for s in tri.simplices:
        for a, b in ((0, 1), (1, 2), (0, 2)):
            pairs.add((int(s[a]), int(s[b])))
            pairs.add((int(s[b]), int(s[a])))
    return onp.array(sorted(pairs), dtype=onp.int64)


def with_topology(inst: dict, graphs: str) -> dict:
    """The instance with edges (and edge features) of the given topology."""
    if graphs == "full":
        E1 = E2 = gm.full_edges(len(inst["points1"]))
    elif graphs == "delaunay":
        E1, E2 = delaunay_edges(inst["points1"]), delaunay_edges(inst["points2"])
    else:
        raise ValueError(f"graphs must be 'full' or 'delaunay', got {graphs!r}")
    return dict(inst, E1=E1, E2=E2, P1=gm.edge_features(inst["points1"], E1),
                P2=gm.edge_features(inst["points2"], E2))


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
    """The relaxed assignment ``X`` (n x n) of one branch, scaled to norm sqrt(n)."""
    if branch.startswith("PI-"):
        y = gm.power_iteration_layer(M, iterations=int(branch[3:]))
    elif branch == "SM":
        y = gm.spectral_matching_layer(M)
    elif branch == "SMAC":
        y = gm.smac_layer(M, shape=(n, n))
    else:
        raise ValueError(f"unknown branch {branch!r}; expected one of {BRANCHES}")
    X = np.reshape(y, (n, n))
    return X * onp.sqrt(n) / np.sqrt(np.sum(X * X))


def soft_assignment(params, inst, branch):
    """``V = voting(sinkhorn(X))``: the Fig. 7 pipeline up to the voting layer."""
    n = inst["X_true"].shape[0]
    X = branch_scores(branch, affinity(params, inst), n)
    S = gm.sinkhorn_layer(X, tau=SINKHORN_TAU)
    return gm.voting_layer(S, VOTING_T), X


def predicted_positions(V, inst):
    """``p1_i + d_i = sum_a V[i, a] p2_a``."""
    return np.dot(V, inst["points2"])


def true_positions(inst) -> onp.ndarray:
    return inst["points2"][inst["X_true"].argmax(axis=1)]


def instance_loss(params, inst, branch):
    """Displacement loss (robust L2) on the inlier rows."""
    V, _ = soft_assignment(params, inst, branch)
    rows = inst["inliers1"]
    err = predicted_positions(V, inst)[rows] - true_positions(inst)[rows]
    return np.mean(np.sqrt(np.sum(err * err, axis=1) + 1e-6))


def batch_loss(params, batch, branch):
    return sum(instance_loss(params, inst, branch) for inst in batch) / len(batch)


def pck_threshold(inst) -> float:
    """``alpha * sqrt(w^2 + h^2)`` of the bounding box of graph 2's keypoints."""
    w, h = inst["points2"].max(axis=0) - inst["points2"].min(axis=0)
    return ALPHA * float(onp.hypot(w, h))


def evaluate(params, instances, branch) -> Dict[str, float]:
    """PCK@0.1 (soft prediction), Hungarian accuracy, and failed instances."""
    hits, acc, failed = [], [], 0
    for inst in instances:
        rows = inst["inliers1"]
        try:
            V, X = soft_assignment(params, inst, branch)
        except NimplicitError:
            failed += 1
            hits.extend([False] * int(rows.sum()))
            acc.append(0.0)
            continue
        err = onp.asarray(predicted_positions(V, inst))[rows] - true_positions(inst)[rows]
        hits.extend(onp.linalg.norm(err, axis=1) <= pck_threshold(inst))
        acc.append(gm.matching_accuracy(gm.hungarian(X), inst["X_true"]))
    return {"pck": float(onp.mean(hits)), "accuracy": float(onp.mean(acc)), "failed": failed}


def train(branch, params, sample_batch: Callable, evaluate_fn: Callable, iterations: int,
          lr: float, eval_every: int):
    """Adam on the displacement loss; returns ``(params, curve, ms_per_step, failures)``
    with ``curve`` a list of ``(iteration, metrics)``."""
    objective = value_and_grad(batch_loss)
    state, failures = None, SkipCounter()
    curve = [(0, evaluate_fn(params, branch))]
    seconds = 0.0
    for it in range(1, iterations + 1):
        t0 = time.perf_counter()
        out = guarded_step(objective, params, sample_batch(it), branch, counter=failures,
                           where=f"{branch} iteration {it}")
        if out is not None:
            params, state = nn.adam(params, out[1], lr=lr, state=state)
        seconds += time.perf_counter() - t0
        if it % eval_every == 0 or it == iterations:
            curve.append((it, evaluate_fn(params, branch)))
    return params, curve, 1e3 * seconds / iterations, failures


def _flat(tree):
    return onp.concatenate([onp.ravel(tree[k]) for k in sorted(tree)])


def gradient_agreement(params, batch, branches) -> Dict[str, float]:
    """Cosine between each branch's gradient and SM's at the initial weights."""
    g = {b: _flat(grad(batch_loss)(params, batch, b)) for b in set(branches) | {"SM"}}
    return {b: float(g[b] @ g["SM"] / (onp.linalg.norm(g[b]) * onp.linalg.norm(g["SM"])))
            for b in branches}


def run_branches(init, pool, test, args, label: str) -> dict:
    """Train every branch from ``init`` on the same batches; print and return the curves."""
    out = {"curves": {}, "ms_per_iteration": {}, "skipped_steps": {}, "failures": {},
           "trained": {}}
    for branch in args.branches:
        t0 = time.perf_counter()
        params, curve, ms, failures = train(branch, init, lambda it: pool[(it - 1) % len(pool)],
                                            lambda p, b: evaluate(p, test, b), args.iterations,
                                            args.lr, args.eval_every)
        out["trained"][branch] = params
        out["curves"][branch] = [(i, m["pck"], m["accuracy"]) for i, m in curve]
        out["ms_per_iteration"][branch] = ms
        out["skipped_steps"][branch] = failures.skipped
        out["failures"][branch] = failures.as_dict()
        print(f"  [{label}] {branch:>5}: PCK@0.1 " + " ".join(f"{m['pck']:.3f}@{i}"
                                                             for i, m in curve[::2])
              + f" | final PCK {curve[-1][1]['pck']:.3f}, accuracy {curve[-1][1]['accuracy']:.3f}"
              f" ({ms:.0f} ms/iteration, {time.perf_counter() - t0:.0f} s, "
              f"{failures.skipped} steps skipped)", flush=True)
    return out


# ------------------------------------------------------------------------------
# part 1: synthetic keypoints
# ------------------------------------------------------------------------------

def synthetic_experiment(args, results: dict, figures: dict):
    rng = onp.random.default_rng(args.seed)
    Q = mixing_matrix(rng, 16)
    cfg = dict(n=args.inliers, outliers=args.outliers, mixing=Q)
    base_test = [synthetic_pair(rng, noise=args.noise, **cfg) for _ in range(args.test_size)]
    train_rng = onp.random.default_rng(args.seed + 1)
    base_pool = [[synthetic_pair(train_rng, noise=args.noise, **cfg) for _ in range(args.batch)]
                 for _ in range(args.iterations)]
    init = init_params(onp.random.default_rng(args.seed + 2), 16)
    per_graph = {}
    for graphs in args.graphs:
        test = [with_topology(inst, graphs) for inst in base_test]
        pool = [[with_topology(inst, graphs) for inst in batch] for batch in base_pool]
        print(f"\n== synthetic, {graphs} graphs: {args.inliers} inliers + {args.outliers} "
              f"outliers, noise {args.noise}, {args.iterations} iterations x batch "
              f"{args.batch}, test {args.test_size} ==", flush=True)
        cos = gradient_agreement(init, pool[0], args.branches)
        print("  cosine of each branch's initial gradient with SM's: "
              + ", ".join(f"{b} {c:.4f}" for b, c in cos.items()), flush=True)
        run = run_branches(init, pool, test, args, graphs)
        run["initial_gradient_cosine_to_SM"] = cos
        per_graph[graphs] = run
    main_graphs = args.graphs[0]
    trained = per_graph[main_graphs]["trained"]
    print(f"\nfinal PCK@0.1 vs deformation noise ({main_graphs} graphs, trained weights, "
          f"fresh test sets):")
    sweep_rng = onp.random.default_rng(args.seed + 3)
    noise_table = {}
    for noise in args.noise_levels:
        insts = [with_topology(synthetic_pair(sweep_rng, noise=noise, **cfg), main_graphs)
                 for _ in range(args.test_size)]
        noise_table[str(noise)] = {b: evaluate(trained[b], insts, b)["pck"] for b in trained}
        print(f"  noise {noise:.3f}: " + "  ".join(f"{b} {a:.3f}"
                                                  for b, a in noise_table[str(noise)].items()),
              flush=True)
    results["synthetic"] = {g: {k: v for k, v in r.items() if k != "trained"}
                            for g, r in per_graph.items()}
    results["synthetic_pck_vs_noise"] = noise_table
    figures["synthetic"] = (per_graph, [with_topology(i, main_graphs) for i in base_test[:1]],
                            main_graphs)
    return trained, [with_topology(inst, main_graphs) for inst in base_test]


# ------------------------------------------------------------------------------
# part 2: real images
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
    return pts_l, pts_r, f_l, f_r, (left, right)


def keypoint_instance(rng, ids, n, outliers, pts_l, pts_r, f_l, f_r, graphs):
    """Graph 1: keypoints ids[:n] (inliers) and ids[n:n+o] seen only on the left;
    graph 2: the inliers' true right positions and ids[n+o:n+2o] seen only on the right."""
    left = onp.concatenate([ids[:n], ids[n:n + outliers]])
    right = onp.concatenate([ids[:n], ids[n + outliers:n + 2 * outliers]])
    N = len(left)
    perm = rng.permutation(N)
    right = right[perm]
    X_true = onp.zeros((N, N))
    X_true[onp.arange(n), onp.argsort(perm)[:n]] = 1.0
    inst = {"F1": f_l[left], "F2": f_r[right], "points1": pts_l[left], "points2": pts_r[right],
            "X_true": X_true, "inliers1": onp.arange(N) < n, "ids1": left, "ids2": right}
    return with_topology(inst, graphs)


def stereo_experiment(args, results: dict, figures: dict):
    import importlib.util
    if importlib.util.find_spec("skimage") is None:
        print("\n== real images: skipped (scikit-image not installed; pip install scikit-image) ==")
        return
    pts_l, pts_r, f_l, f_r, images = stereo_keypoints(max_points=120)
    rng = onp.random.default_rng(args.seed + 10)
    order = rng.permutation(len(pts_l))
    half = len(order) // 2
    train_ids, test_ids = order[:half], order[half:]
    n, o = args.stereo_nodes, args.stereo_outliers
    graphs = args.graphs[0]
    sample = lambda ids: keypoint_instance(rng, rng.choice(ids, n + 2 * o, replace=False), n, o,
                                           pts_l, pts_r, f_l, f_r, graphs)
    test = [sample(test_ids) for _ in range(args.test_size)]
    pool = [[sample(train_ids) for _ in range(args.batch)] for _ in range(args.stereo_iterations)]
    init = init_params(onp.random.default_rng(args.seed + 11), f_l.shape[1])
    print(f"\n== real images: skimage stereo_motorcycle, {len(pts_l)} Harris keypoints with "
          f"disparity ground truth, {graphs} graphs of {n} matched + {o} unmatched keypoints "
          f"(train/test keypoints disjoint), {args.stereo_iterations} iterations ==", flush=True)
    sub = argparse.Namespace(**dict(vars(args), iterations=args.stereo_iterations,
                                    eval_every=max(args.stereo_iterations // 8, 1)))
    run = run_branches(init, pool, test, sub, "stereo")
    results["stereo"] = {k: v for k, v in run.items() if k != "trained"}
    figures["stereo"] = (run, test[0], images)


def cub_experiment(args, results: dict, figures: dict):
    """CUB-200-2011 pairs of the same class from a local copy (``--cub PATH``)."""
    from examples.datasets import cub_pairs, load_cub
    data = load_cub(args.cub)
    rng = onp.random.default_rng(args.seed + 20)
    graphs = args.graphs[0]
    pairs = cub_pairs(data, rng, args.batch * args.cub_iterations + args.test_size,
                      min_common=4, patch=PATCH)
    insts = [with_topology(p, graphs) for p in pairs]
    test, train_insts = insts[:args.test_size], insts[args.test_size:]
    pool = [train_insts[i * args.batch:(i + 1) * args.batch] for i in range(args.cub_iterations)]
    init = init_params(onp.random.default_rng(args.seed + 21), insts[0]["F1"].shape[1])
    print(f"\n== CUB-200-2011 from {args.cub}: {len(insts)} same-class pairs, {graphs} graphs ==",
          flush=True)
    sub = argparse.Namespace(**dict(vars(args), iterations=args.cub_iterations,
                                    eval_every=max(args.cub_iterations // 8, 1)))
    run = run_branches(init, pool, test, sub, "cub")
    results["cub"] = {k: v for k, v in run.items() if k != "trained"}


# ------------------------------------------------------------------------------
# part 3: pygmtools solvers on the same instances
# ------------------------------------------------------------------------------

def pygmtools_comparison(results, params, test):
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
        print(f"  {name:>10}: accuracy {rows[name]['accuracy']:.3f}, {rows[name]['ms']:.2f} ms")
    results["solvers_on_learned_affinity"] = rows


# ------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------

def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("(matplotlib not installed: no figures)")
        return None


def plot_fig9(figures: dict, out: Results) -> None:
    plt = _plt()
    if plt is None:
        return
    panels = [(f"synthetic, {g} graphs", run) for g, run in figures["synthetic"][0].items()]
    if "stereo" in figures:
        panels.append(("stereo pair (real image)", figures["stereo"][0]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (title, run) in zip(axes[0], panels):
        for branch, curve in run["curves"].items():
            it, pck, _ = zip(*curve)
            ax.plot(it, pck, marker="o", ms=3, label=branch)
        ax.set(xlabel="training iteration", ylabel="PCK@0.1 (test)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.figure_path("fig9"), dpi=120)
    plt.close(fig)


def plot_fig8(figures: dict, out: Results) -> None:
    """Source keypoints, the predicted positions and the ground truth in the target."""
    plt = _plt()
    if plt is None:
        return
    show = [b for b in ("PI-10", "SM", "SMAC") if b in figures["branches"]]
    if "stereo" in figures:
        run, inst, (left, right) = figures["stereo"]
        fig, axes = plt.subplots(1, 1 + len(show), figsize=(4.2 * (1 + len(show)), 3.6))
        rows = inst["inliers1"]
        axes[0].imshow(left)
        axes[0].scatter(*inst["points1"][rows].T, s=18, c="yellow", edgecolors="k")
        axes[0].set_title("source (left image)", fontsize=9)
        for ax, branch in zip(axes[1:], show):
            V, _ = soft_assignment(run["trained"][branch], inst, branch)
            pred = onp.asarray(predicted_positions(V, inst))[rows]
            true = true_positions(inst)[rows]
            ok = onp.linalg.norm(pred - true, axis=1) <= pck_threshold(inst)
            ax.imshow(right)
            ax.scatter(*true.T, s=30, facecolors="none", edgecolors="lime", label="ground truth")
            ax.scatter(*pred.T, s=14, c=onp.where(ok, "cyan", "red"), label="prediction")
            for p, t in zip(pred, true):
                ax.plot([p[0], t[0]], [p[1], t[1]], "w-", lw=0.6)
            ax.set_title(f"{branch}: PCK {ok.mean():.2f} (target, right image)", fontsize=9)
            ax.legend(fontsize=6, loc="lower right")
        for ax in axes:
            ax.set_axis_off()
    else:
        per_graph, insts, graphs = figures["synthetic"]
        inst = insts[0]
        rows = inst["inliers1"]
        fig, axes = plt.subplots(1, 1 + len(show), figsize=(3.6 * (1 + len(show)), 3.4))
        axes[0].scatter(*inst["points1"][rows].T, c="k", s=14)
        axes[0].set_title("source", fontsize=9)
        for ax, branch in zip(axes[1:], show):
            V, _ = soft_assignment(per_graph[graphs]["trained"][branch], inst, branch)
            pred = onp.asarray(predicted_positions(V, inst))[rows]
            true = true_positions(inst)[rows]
            ax.scatter(*true.T, s=30, facecolors="none", edgecolors="g", label="ground truth")
            ax.scatter(*pred.T, s=12, c="r", label="prediction")
            ax.set_title(branch, fontsize=9)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out.figure_path("fig8"), dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------

def _final_pck(run: dict) -> Dict[str, float]:
    return {b: c[-1][1] for b, c in run["curves"].items()}


def summary_rows(results: dict) -> List[tuple]:
    rows = []
    for label, run in [(f"synthetic {g}", r) for g, r in results["synthetic"].items()] + \
            ([("stereo", results["stereo"])] if "stereo" in results else []) + \
            ([("cub", results["cub"])] if "cub" in results else []):
        final = _final_pck(run)
        order = " > ".join(sorted(final, key=final.get, reverse=True))
        rows.append((f"final PCK@0.1, {label}", ", ".join(f"{b} {v:.3f}" for b, v in
                                                         final.items()), ""))
        rows.append((f"ordering, {label}", order, "PI = k, SM, SMAC (as in Fig. 9)"))
        rows.append((f"steps skipped, {label}", str(sum(run["skipped_steps"].values())), "-"))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--graphs", nargs="+", choices=["delaunay", "full"],
                    default=None, help="graph topologies (the first is the main one)")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--test-size", type=int, default=None)
    ap.add_argument("--branches", nargs="+", choices=BRANCHES, default=None,
                    help="train only these branches (default: all)")
    ap.add_argument("--stereo-iterations", type=int, default=None)
    ap.add_argument("--no-stereo", action="store_true")
    ap.add_argument("--cub", metavar="PATH", default=None,
                    help="a local CUB-200-2011 folder (images/, parts/part_locs.txt, ...)")
    ap.add_argument("--cub-iterations", type=int, default=100)
    ap.add_argument("--out", default=None, help="results folder (default examples/results)")
    args = ap.parse_args(argv)
    args.branches = [b for b in BRANCHES if b in (args.branches or BRANCHES)]
    q = args.quick
    args.graphs = args.graphs or (["delaunay"] if q else ["delaunay", "full"])
    args.inliers, args.outliers, args.noise = 10, 2, 0.05
    args.iterations = args.iterations or (20 if q else 100)
    args.batch = 4
    args.test_size = args.test_size or (8 if q else 20)
    args.eval_every = 5 if q else 10
    args.lr = 0.05
    args.noise_levels = [0.0, 0.1] if q else [0.0, 0.05, 0.1, 0.15]
    args.eval_every = min(args.eval_every, args.iterations)
    args.stereo_nodes = 10
    args.stereo_outliers = 4
    args.stereo_iterations = args.stereo_iterations or (10 if q else 60)
    out = Results("graph_matching", args, args.seed, out_dir=args.out, tag="quick" if q else "")
    out.set_command(argv)
    results, figures = {}, {"branches": args.branches}
    t0 = time.perf_counter()
    trained, test = synthetic_experiment(args, results, figures)
    if not args.no_stereo:
        stereo_experiment(args, results, figures)
    if args.cub:
        cub_experiment(args, results, figures)
    if "SM" in trained:
        pygmtools_comparison(results, trained["SM"], test)
    plot_fig9(figures, out)
    plot_fig8(figures, out)
    rows = summary_rows(results)
    print("\nbeside the paper (Fig. 9):\n" + paper_table(rows))
    for line in DIFFERENCES:
        print("  difference: " + line)
    out.data["metrics"] = results
    out.data["paper"] = PAPER
    out.data["differences"] = DIFFERENCES
    out.data["table"] = paper_table(rows)
    path = out.write()
    print(f"\nresults: {path}   total {time.perf_counter() - t0:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
