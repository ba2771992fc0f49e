"""The examples in reduced but real configurations (many Adam steps through each
layer's backward), their skip-and-count of typed failures, their results files,
and their ``--quick`` runs (slow-marked where they take more than ~20 s)."""
from __future__ import annotations

import glob
import json
import os

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import value_and_grad
from autograd.extend import defvjp, primitive

from examples import _results
from nimplicit.errors import LinearSolveError, NimplicitError, SolverError

REQUIRED = ("command", "seed", "config", "environment", "wall_seconds", "metrics", "paper",
            "differences", "figures")


def _results_file(folder, stem):
    files = sorted(glob.glob(os.path.join(folder, f"{stem}-2*.json")))
    assert len(files) == 1, files
    with open(files[0]) as f:
        data = json.load(f)
    for key in REQUIRED:
        assert key in data, key
    assert data["environment"]["versions"]["numpy"] == np.__version__
    assert "OMP_NUM_THREADS" in data["environment"]["threads"]
    assert data["differences"] and data["paper"]
    return data


class _Poison:
    """An identity primitive whose backward raises LinearSolveError on every k-th call."""

    def __init__(self, every: int):
        self.every, self.calls = every, 0

        @primitive
        def ident(x):
            return x

        def vjp(ans, x):
            def g(v):
                self.calls += 1
                if self.calls % self.every == 0:
                    raise LinearSolveError(f"injected backward failure #{self.calls}")
                return v
            return g

        defvjp(ident, vjp)
        self.ident = ident


# ------------------------------------------------------------------------------ the guard


def test_guarded_step_counts_forward_and_backward_failures():
    poison = _Poison(every=2)

    def loss(x, fail_forward):
        if fail_forward:
            raise SolverError("injected forward failure")
        return anp.sum(poison.ident(x) ** 2)

    counter = _results.SkipCounter()
    f = value_and_grad(loss)
    out = _results.guarded_step(f, np.ones(3), False, counter=counter)
    np.testing.assert_allclose(out[1], 2 * np.ones(3))
    assert _results.guarded_step(f, np.ones(3), False, counter=counter) is None   # backward
    assert _results.guarded_step(f, np.ones(3), True, counter=counter) is None    # forward
    assert counter.skipped == 2
    assert counter.by_type == {"LinearSolveError": 1, "SolverError": 1}
    with pytest.raises(ZeroDivisionError):        # a bug in user code is not swallowed
        _results.guarded_step(lambda: 1 / 0, counter=counter)


# ------------------------------------------------------------------------------ NCut


NCUT_SMALL = ["--train", "16", "--test", "3", "--epochs", "2", "--batch", "2", "--size", "12",
              "--tune", "3"]


def test_ncut_reduced_run_trains_through_the_backward(tmp_path):
    from examples import ncut_segmentation as ex
    res = ex.main(NCUT_SMALL + ["--out", str(tmp_path)])
    hist = res["history"]
    assert hist["steps"] == 16
    assert len(hist["step_loss"]) + hist["skipped_steps"] == 16
    assert len(hist["step_loss"]) >= 12 and np.isfinite(hist["step_loss"]).all()
    # training moved the alignment loss down
    assert np.mean(hist["step_loss"][-4:]) < np.mean(hist["step_loss"][:4])
    data = _results_file(str(tmp_path), "ncut_segmentation")
    assert data["metrics"]["steps"] == 16
    assert data["metrics"]["learned_test_iou"] == pytest.approx(res["learned"]["iou_threshold0"])
    assert data["command"].startswith("python -m examples.ncut_segmentation --train 16")


def test_ncut_backward_failures_are_skipped_and_counted(tmp_path, monkeypatch):
    from examples import ncut_segmentation as ex
    # 2 graphs per step; a raising vjp ends that step's backward, so the 5th, 10th, ...
    # call falls in steps 3, 6, 9, 12, 15
    poison = _Poison(every=5)
    original = ex.alignment_loss
    monkeypatch.setattr(ex, "alignment_loss", lambda v, d, m: original(poison.ident(v), d, m))
    res = ex.main(NCUT_SMALL + ["--out", str(tmp_path)])
    hist = res["history"]
    assert hist["skipped_steps"] == 5
    assert hist["failures"]["by_type"] == {"LinearSolveError": 5}
    assert hist["failures"]["first_failure"].startswith("epoch 1 step 3:")
    assert len(hist["step_loss"]) == 11
    data = _results_file(str(tmp_path), "ncut_segmentation")
    assert data["metrics"]["skipped_steps"] == 5


# ------------------------------------------------------------------------------ level set


LEVEL_SET_SMALL = ["--per-category", "4", "--steps", "12", "--batch", "4", "--basis", "8"]


def test_level_set_reduced_run_and_determinism(tmp_path):
    from examples import level_set_shapes as ex
    a = ex.main(LEVEL_SET_SMALL + ["--out", str(tmp_path / "a")])
    b = ex.main(LEVEL_SET_SMALL + ["--out", str(tmp_path / "b")])
    for run in (a, b):
        info = run["metrics"]["training"]
        assert info["level_set"]["skipped_steps"] == 0 and info["voxel"]["skipped_steps"] == 0
    assert a["metrics"]["results"] == b["metrics"]["results"]   # same seed, same threads
    data = _results_file(str(tmp_path / "a"), "level_set_shapes")
    table = data["metrics"]["results"]
    assert "mean" in table["level_set"]
    assert set(table["level_set"]) <= {"superquadric", "torus", "capsule", "union", "mean"}
    assert 0 <= table["level_set"]["mean"]["iou"] <= 1


def test_level_set_step_failures_are_skipped(tmp_path, monkeypatch):
    from examples import level_set_shapes as ex
    poison = _Poison(every=7)
    original = ex.chamfer_distance
    monkeypatch.setattr(ex, "chamfer_distance", lambda v, p: original(poison.ident(v), p))
    res = ex.main(LEVEL_SET_SMALL + ["--out", str(tmp_path)])
    info = res["metrics"]["training"]["level_set"]
    assert info["skipped_steps"] >= 2
    assert info["skipped_steps"] + info["updates"] == 12
    assert info["failures"]["by_type"] == {"LinearSolveError": info["skipped_steps"]}
    assert res["metrics"]["training"]["voxel"]["skipped_steps"] == 0


# ------------------------------------------------------------------------------ QP


def test_qp_quick_run_and_results(tmp_path):
    from examples import qp_digits as ex
    hist = ex.main(["--quick", "--no-qpth", "--out", str(tmp_path)])
    ours = hist["nimplicit qp_layer"]
    assert len(ours) == 3 and ours[-1]["test_acc"] > 0.8
    data = _results_file(str(tmp_path), "qp_digits-quick")
    assert data["metrics"]["skipped_steps"] == 0
    assert data["metrics"]["qpth"] == "skipped (--no-qpth)"


def test_qp_equality_option(tmp_path):
    from examples import qp_digits as ex
    hist = ex.main(["--quick", "--no-qpth", "--eq", "2", "--epochs", "1",
                    "--out", str(tmp_path)])
    assert hist["nimplicit qp_layer"][-1]["test_acc"] > 0.5
    data = _results_file(str(tmp_path), "qp_digits-quick")
    assert data["config"]["eq"] == 2


def test_qp_equality_constraints_hold_through_training():
    """``--eq 5``: five learned equalities next to m = 20 inequalities; after Adam steps
    through the layer's backward, the trained QP's solutions still satisfy ``A y = b``
    and ``G y <= h`` (the equalities are in the layer, not only in the options)."""
    from examples import qp_digits as ex
    from reference_layers.qp import qp_layer
    Xtr, ytr, Xte, yte = ex.load_digits_split(0)
    Xtr, Xte = ex.standardize(Xtr, Xte)
    data = (Xtr[:256], ytr[:256], Xte[:128], yte[:128])
    rng = np.random.default_rng(0)
    params = ex.init_equalities(rng, ex.init_params(rng, Xtr.shape[1], 32, 10, 20), 5)
    failures = _results.SkipCounter()
    trained, hist = ex.train_ours(params, data, 2, 32, 3e-3, 0, 0.0, 0.1, failures)
    assert failures.skipped == 0
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert not np.allclose(trained["A"], params["A"])          # A is learned
    q = ex.nn.dense(trained["fc2"], ex.nn.relu(ex.nn.dense(trained["fc1"], Xte[:64])))
    Q, G, h, A, b = ex.qp_data(trained, 0.1)
    y = qp_layer(Q, q, G, h, A, b)
    assert A.shape == (5, 10) and y.shape == (64, 10)
    assert np.max(np.abs(y @ A.T - b)) < 1e-8
    assert np.max(y @ G.T - h) < 1e-8


def test_qp_eq_option_end_to_end(tmp_path):
    from examples import qp_digits as ex
    hist = ex.main(["--quick", "--no-qpth", "--eq", "5", "--epochs", "1", "--out", str(tmp_path)])
    ours = hist["nimplicit qp_layer"]
    assert len(ours) == 1 and ours[0]["skipped_steps"] == 0
    assert ours[0]["test_acc"] > 0.5                              # chance is 0.1
    data = _results_file(str(tmp_path), "qp_digits-quick")
    assert data["config"]["eq"] == 5 and data["config"]["ineq"] == 20
    assert data["config"]["epochs"] == 1                          # --epochs wins over --quick's 3


def test_qp_optnet_preset_end_to_end(tmp_path):
    """``--preset optnet`` on the digits in a short configuration: OptNet's sizes (200
    inequalities, eps 1e-4, 50 hidden units, batch 64, lr 1e-3) reach the layer, the
    loss goes down, and the run gets its own results file; explicit options win."""
    from examples import qp_digits as ex
    hist = ex.main(["--quick", "--no-qpth", "--preset", "optnet", "--epochs", "2",
                    "--out", str(tmp_path)])
    ours = hist["nimplicit qp_layer"]
    assert len(ours) == 2 and all(h["skipped_steps"] == 0 for h in ours)
    assert ours[1]["train_loss"] < ours[0]["train_loss"]
    data = _results_file(str(tmp_path), "qp_digits-optnet-quick")
    for key, value in ex.OPTNET_PRESET.items():
        assert data["config"][key] == value, key
    assert not glob.glob(os.path.join(str(tmp_path), "qp_digits-quick-*.json"))
    ex.main(["--quick", "--no-qpth", "--preset", "optnet", "--eq", "5", "--epochs", "1",
             "--out", str(tmp_path / "eq")])
    data = _results_file(str(tmp_path / "eq"), "qp_digits-optnet-quick")
    assert data["config"]["eq"] == 5 and data["config"]["ineq"] == 200


def test_results_record_the_git_commit(tmp_path):
    import subprocess
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if head.returncode:
        pytest.skip("not a git checkout")
    out = _results.Results("demo", {"a": 1}, 0, out_dir=str(tmp_path))
    with open(out.write()) as f:
        git = json.load(f)["git"]
    assert git["commit"] == head.stdout.strip()
    assert isinstance(git["dirty"], bool) and git["dirty"] == bool(git["dirty_files"])
    assert not any(p.startswith(("examples/results", "benchmarks/results"))
                   for p in git["dirty_files"])
    outside = _results.git_info(cwd=str(tmp_path))                 # not a checkout
    assert outside["commit"] is None and outside["dirty"] is None


def test_qp_equality_only_is_clear(tmp_path):
    from examples import qp_digits as ex
    try:
        ex.main(["--quick", "--no-qpth", "--ineq", "0", "--eq", "2", "--out", str(tmp_path)])
    except NimplicitError as exc:        # equality-only QPs not supported by the layer yet
        assert "--ineq" in str(exc) and "equality-only" in str(exc)
    else:
        _results_file(str(tmp_path), "qp_digits-quick")


def test_qp_optnet_preset_and_qpth_message(monkeypatch):
    from examples import qp_digits as ex
    assert ex.OPTNET_PRESET["ineq"] > 20 and ex.OPTNET_PRESET["eq"] == 0
    present = {"torch", "qpth"}
    monkeypatch.setattr(ex.importlib.util, "find_spec",
                        lambda name: object() if name in present else None)
    msg = ex.qpth_status()
    assert "cvxpy is missing" in msg and "qpth and torch are installed" in msg
    present.clear()
    assert "torch, qpth, cvxpy are not installed" in ex.qpth_status()


# ------------------------------------------------------------------------------ graph matching


def test_graph_matching_reduced_run(tmp_path):
    from examples import graph_matching as ex
    branches = ["PI-5", "SM", "SMAC"]
    res = ex.main(["--iterations", "5", "--test-size", "2", "--no-stereo", "--branches",
                   *branches, "--graphs", "delaunay", "--out", str(tmp_path)])
    run = res["synthetic"]["delaunay"]
    assert list(run["curves"]) == branches
    for branch, curve in run["curves"].items():
        assert curve[0][0] == 0 and curve[-1][0] == 5
        assert all(0 <= pck <= 1 for _, pck, _ in curve)
        assert run["skipped_steps"][branch] == 0
    data = _results_file(str(tmp_path), "graph_matching")
    assert "graph_matching-fig9.png" in data["figures"]
    assert os.path.exists(tmp_path / "graph_matching-fig9.png")
    assert os.path.exists(tmp_path / "graph_matching-fig8.png")


def test_delaunay_edges_are_symmetric_and_planar():
    from examples.graph_matching import delaunay_edges
    pts = np.random.default_rng(0).uniform(-1, 1, (12, 2))
    E = delaunay_edges(pts)
    pairs = {tuple(e) for e in E}
    assert all((j, i) in pairs for i, j in pairs)
    # a planar triangulation has at most 3n - 6 undirected edges; a full graph has n(n-1)/2
    assert len(pairs) // 2 <= 3 * 12 - 6 < 12 * 11 // 2
    assert len(delaunay_edges(np.array([[0, 0], [1, 1], [2, 2], [3, 3.0]]))) == 12   # collinear


# ------------------------------------------------------------------------------ --quick runs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ncut_segmentation", "level_set_shapes", "graph_matching"])
def test_quick_runs(name, tmp_path):
    import importlib
    importlib.import_module(f"examples.{name}").main(["--quick", "--out", str(tmp_path)])
    _results_file(str(tmp_path), f"{name}-quick")


# ------------------------------------------------------------------------------ real-data paths


def test_ncut_reads_a_hazysky_folder(tmp_path):
    from test_loaders import _save_png, _sky_scene
    from examples import ncut_segmentation as ex
    rng = np.random.default_rng(0)
    for k in range(10):
        img, mask = _sky_scene(rng, 24, 24, int(rng.integers(6, 18)))
        _save_png(str(tmp_path / "sky" / "images" / f"{k:03d}.png"), img)
        _save_png(str(tmp_path / "sky" / "masks" / f"{k:03d}.png"), mask)
    res = ex.main(["--hazysky", str(tmp_path / "sky"), "--train", "6", "--test", "2",
                   "--epochs", "1", "--batch", "2", "--size", "12", "--tune", "2",
                   "--out", str(tmp_path / "out")])
    assert res["data"].startswith("HazySky-style folder")
    assert res["n_train"] == 6 and res["n_test"] == 2 and res["history"]["steps"] == 3
    # two flat colours split by a horizon: even the classical affinity finds the sky
    assert res["classical"]["iou_threshold0"] > 0.8


def test_level_set_reads_shapenet_voxels(tmp_path):
    from test_loaders import _write_binvox
    from examples import datasets, level_set_shapes as ex
    rng = np.random.default_rng(1)
    x = np.linspace(-1, 1, 32)
    X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
    for cat in ("car", "sofa"):
        for k in range(5):
            a, b, c = rng.uniform(0.3, 0.8, 3) * (1.0 if cat == "car" else [1.0, 0.6, 0.6])
            vox = (X / a) ** 2 + (Y / b) ** 2 + (Z / c) ** 2 < 1
            _write_binvox(str(tmp_path / "ShapeNetVox32" / datasets.SHAPENET_SYNSETS[cat]
                              / f"m{k}" / "model.binvox"), vox)
    res = ex.main(["--shapenet", str(tmp_path), "--steps", "4", "--batch", "2", "--basis", "4",
                   "--out", str(tmp_path / "out")])
    assert res["metrics"]["categories"] == ["car", "sofa"]
    table = res["metrics"]["results"]["level_set"]
    assert "mean" in table and set(table) <= {"car", "sofa", "mean"}
    assert res["metrics"]["training"]["level_set"]["updates"] == 4


def test_graph_matching_reads_cub(tmp_path):
    from test_loaders import _write_cub
    from examples import graph_matching as ex
    _write_cub(tmp_path / "cub", np.random.default_rng(2), n_images=6, size=(40, 50))
    res = ex.main(["--cub", str(tmp_path / "cub"), "--iterations", "2", "--cub-iterations",
                   "3", "--test-size", "2", "--branches", "SM", "--no-stereo",
                   "--graphs", "delaunay", "--out", str(tmp_path / "out")])
    cub = res["cub"]
    assert list(cub["curves"]) == ["SM"] and cub["curves"]["SM"][-1][0] == 3
    assert cub["skipped_steps"]["SM"] == 0


# ------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("branch", ["PI-10", "SM", "SMAC"])
def test_graph_matching_pipeline_gradient_matches_finite_differences(branch):
    """The Fig. 7 chain (affinity -> branch -> Sinkhorn layer -> voting -> displacement
    loss) of one instance, differentiated in the node map and the kernel weights."""
    from verification import check_grad
    from verification.strategies.graph_matching import mixing_matrix, synthetic_pair
    from examples import graph_matching as ex
    rng = np.random.default_rng(7)
    inst = ex.with_topology(synthetic_pair(rng, n=5, outliers=1, mixing=mixing_matrix(rng, 16)),
                            "delaunay")
    params = ex.init_params(np.random.default_rng(8), 16)

    def loss(W, log_w):
        return ex.instance_loss(dict(params, W=W, log_w=log_w), inst, branch)

    report = check_grad(loss, params["W"], params["log_w"], modes=("rev",), noise=1e-9)
    assert report.passed, report


# ------------------------------------------------------------------------------ the report


def _write(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f)


def test_report_renders_the_newest_untagged_results(tmp_path):
    from examples import report
    base = {"command": "python -m examples.qp_digits", "seed": 0, "wall_seconds": 90.0,
            "environment": {"machine": "x86_64", "platform": "Linux", "cpu_count": 2,
                            "threads": {"OMP_NUM_THREADS": "1"}, "versions": {"numpy": "2"}},
            "git": {"commit": "a" * 40, "dirty": False, "dirty_files": []},
            "paper": {"test_accuracy": "> 98%"}, "differences": ["data: digits"],
            "table": "quantity  ours  paper\nacc  0.111  > 98%"}
    _write(tmp_path / "qp_digits-2026-11-30.json", dict(base, table="old 0.999"))
    _write(tmp_path / "qp_digits-2026-12-01.json", base)
    _write(tmp_path / "qp_digits-quick-2026-12-02.json", dict(base, table="quick 0.222"))
    _write(tmp_path / "qp_digits-optnet-2026-12-03.json", dict(base, table="preset 0.333"))
    text = report.render_experiments(str(tmp_path))
    assert "acc  0.111  > 98%" in text and "aaaaaaaaaaaa" in text and "clean work tree" in text
    for other in ("0.999", "0.222", "0.333"):
        assert other not in text
    assert "90 s" in text and "OMP\\_NUM\\_THREADS=1" in text and "data: digits" in text
    assert text.count("No results file") == 3                      # the other three examples
    assert report.render_experiments(str(tmp_path)) == text        # no clock, deterministic


def test_report_renders_benchmark_medians_and_ratios(tmp_path):
    from examples import report
    _write(tmp_path / "gm-20261201-100000.json", {"rows": [{"n": 1, "t": 9.0}]})
    _write(tmp_path / "gm-20261201-120000.json",
           {"machine": {"cpus": 2}, "clock": "cpu", "threads": {"OMP_NUM_THREADS": "1"},
            "git": {"commit": "b" * 40, "dirty": True, "dirty_files": ["x.py"]},
            "rows": [{"n": 10, "fwd": 0.001, "fwd_median": 0.00125, "vs_peer": 2.5}]})
    _write(tmp_path / "qp-2026-12-01.json",
           {"summary": {"one_thread": [{"impl": "ours", "total_ms": 26.2}]}})
    text = report.render_benchmarks(str(tmp_path))
    assert "gm-20261201-120000.json" in text and "100000" not in text
    assert "fwd\\_median" in text and "0.00125" in text and "2.5" in text
    assert "- fwd\n" not in text                   # the minimum is dropped for the median
    assert "dirty work tree: x.py" in text and "bbbbbbbbbbbb" in text
    assert "``one_thread``" in text and "26.2" in text and "2026-12-01" in text


def test_benchmark_results_record_the_commit_and_threads(tmp_path, monkeypatch):
    from benchmarks import _common
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    _common.write_json(str(tmp_path / "b.json"), {"rows": [{"n": 1}], "threads": None})
    _common.write_json(str(tmp_path / "c.json"), {"rows": [{"n": 1}]})
    with open(tmp_path / "b.json") as f:
        kept = json.load(f)
    with open(tmp_path / "c.json") as f:
        added = json.load(f)
    assert kept["threads"] is None                     # a payload's own value wins
    assert added["threads"]["OMP_NUM_THREADS"] == "3"
    assert added["git"] == _results.git_info()       # the same record as the examples'
