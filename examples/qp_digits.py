r"""The paper's QP experiment (Fig. 2-3): a QP layer inside a classifier.

Network (OptNet's MNIST model)::

    x -> fc1 -> ReLU -> fc2 -> q  (one logit-like vector per image, n = 10)
    y = argmin_y 1/2 y'Q y + q'y   s.t.  G y <= h
    log_softmax(y) -> NLL

with learned ``Q = L L' + eps I`` (``eps = 0.1``; OptNet's ``1e-4`` makes ``Q``
nearly singular and the model generalizes worse here: ~95-96% test accuracy), ``G`` (``m x n``) and ``h = G z0 + s0``
(learned ``z0`` and ``s0 = exp(log_s0) > 0``, so ``y = z0`` is strictly
feasible for every parameter value: the QP never becomes infeasible).
``Q``, ``G`` and ``h`` are shared by the batch, ``q`` is batched: the QP layer
broadcasts and its gradients for ``L, G, z0, s0`` are summed over the batch.

Data: scikit-learn's ``load_digits`` (8x8 images, ships with the package),
80/20 split; or MNIST from local IDX files with ``--mnist PATH`` (a directory
holding ``train-images-idx3-ubyte`` etc., optionally ``.gz``; never downloaded).
With qpth installed the same model with qpth's ``QPFunction`` (PyTorch) is
trained from the same initial weights and its curves are drawn on the same plot.

Equality constraints (``--eq p``): a learned ``A`` (``p x n``) with ``b = A z0``, so
``y = z0`` stays feasible.  ``--preset optnet`` is OptNet's MNIST configuration
(``OPTNET_PRESET``: 200 inequalities, no equalities, ``eps = 1e-4``, 50 hidden units,
batch 64, lr 1e-3, as in the defaults of OptNet's ``mnist/train.py`` as we recall them;
the values are listed in the results file).

A training step whose forward or backward raises a typed library error
(:class:`nimplicit.errors.NimplicitError`) is skipped and counted.

Usage::

    python -m examples.qp_digits            # digits, 15 epochs
    python -m examples.qp_digits --quick    # a smoke run
    python -m examples.qp_digits --mnist ~/data/mnist --preset optnet

Results: ``examples/results/qp_digits-<date>.json`` (or ``qp_mnist-...``) and the PNG.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time
import warnings

import autograd.numpy as np
import numpy as onp
from autograd import value_and_grad

from nimplicit import nn
from nimplicit.errors import ImplicitGradientWarning, NimplicitError, UnsupportedError
from reference_layers.qp import qp_layer

from examples._results import Results, SkipCounter, guarded_step, paper_table

# OptNet's MNIST model (Amos & Kolter 2017, mnist/train.py defaults as we recall them)
OPTNET_PRESET = {"hidden": 50, "ineq": 200, "eq": 0, "eps": 1e-4, "batch": 64, "lr": 1e-3}
PAPER = {"test_accuracy": "> 98% (MNIST, 15 epochs, both pipelines)"}
DIFFERENCES = {
    "digits": "data: scikit-learn's 8x8 digits (1437 train / 360 test) by default, not "
              "MNIST's 60000/10000 28x28 images (pass --mnist PATH for local IDX files)",
    "mnist": "data: MNIST from local IDX files, as in the paper",
    "model": "model: OptNet's fc-fc-QP-softmax with Q = LL' + eps I and h = G z0 + s0 "
             "(feasible by construction); eps, m, p and the widths are in 'config'",
}


# ----------------------------------------------------------------------------- data

def standardize(Xtr, Xte):
    """Per-pixel standardization with the training statistics (``+0.1`` keeps
    constant border pixels finite)."""
    mu, sd = Xtr.mean(axis=0), Xtr.std(axis=0) + 0.1
    return (Xtr - mu) / sd, (Xte - mu) / sd


def load_digits_split(seed: int = 0):
    """scikit-learn's digits, scaled to [0, 1], 80/20 stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.2, random_state=seed,
                                          stratify=y)
    return Xtr, ytr, Xte, yte


def load_mnist(root: str):
    """MNIST from local IDX files (:func:`examples.datasets.load_mnist`; never downloaded)."""
    from examples.datasets import load_mnist as _load
    return _load(root)


# ----------------------------------------------------------------------------- model

def init_params(rng, n_in: int, n_hidden: int, n_cls: int, n_ineq: int) -> dict:
    return {"fc1": nn.dense_init(rng, n_in, n_hidden),
            "fc2": nn.dense_init(rng, n_hidden, n_cls),
            "L": onp.tril(rng.uniform(0.0, 1.0, (n_cls, n_cls))) / onp.sqrt(n_cls),
            "G": rng.uniform(-1.0, 1.0, (n_ineq, n_cls)) / onp.sqrt(n_cls),
            "z0": onp.zeros(n_cls),
            "log_s0": onp.zeros(n_ineq)}


def init_equalities(rng, params: dict, n_eq: int) -> dict:
    """Add a learned ``A`` (``p x n``); ``b = A z0`` keeps ``y = z0`` feasible."""
    if n_eq:
        n_cls = params["L"].shape[0]
        params = dict(params, A=rng.uniform(-1.0, 1.0, (n_eq, n_cls)) / onp.sqrt(n_cls))
    return params


def qp_data(params: dict, eps: float):
    r"""``Q = L L' + eps I``, ``G``, ``h = G z0 + exp(log_s0)`` and, with equalities,
    ``A`` and ``b = A z0`` (``None, None`` without)."""
    L = params["L"]
    Q = np.dot(L, L.T) + eps * np.eye(L.shape[0])
    G = params["G"]
    h = np.dot(G, params["z0"]) + np.exp(params["log_s0"])
    if "A" in params:
        return Q, G, h, params["A"], np.dot(params["A"], params["z0"])
    return Q, G, h, None, None


def forward(params: dict, x, eps: float = 0.1):
    q = nn.dense(params["fc2"], nn.relu(nn.dense(params["fc1"], x)))
    Q, G, h, A, b = qp_data(params, eps)
    return nn.log_softmax(qp_layer(Q, q, G, h, A, b))


def loss_fn(params, x, labels, weight_decay: float = 0.0, eps: float = 0.1):
    """NLL plus ``weight_decay * (|W1|^2 + |W2|^2)`` on the fully connected weights."""
    reg = weight_decay * (np.sum(params["fc1"]["W"] ** 2) + np.sum(params["fc2"]["W"] ** 2))
    return nn.nll_loss(forward(params, x, eps), labels) + reg


def check_equality_only(n_cls: int) -> None:
    """Raise a clear :class:`UnsupportedError` when the QP layer cannot solve
    equality-only QPs (``m = 0``) at this version (it crashed untyped on an empty ``h``)."""
    rng = onp.random.default_rng(0)
    A = rng.standard_normal((1, n_cls))
    try:
        qp_layer(onp.eye(n_cls), rng.standard_normal((2, n_cls)), onp.zeros((0, n_cls)),
                 onp.zeros(0), A, onp.zeros(1))
    except NimplicitError:
        raise
    except Exception as exc:
        raise UnsupportedError(
            f"equality-only QPs (--ineq 0 with --eq > 0) fail inside reference_layers.qp at "
            f"this version ({type(exc).__name__}: {exc}); use --ineq 1 or more together with "
            f"--eq") from exc


def evaluate(params, X, y, batch: int = 500, eps: float = 0.1):
    losses, correct = 0.0, 0
    for start in range(0, len(X), batch):
        logp = forward(params, X[start:start + batch], eps)
        losses += float(nn.nll_loss(logp, y[start:start + batch])) * len(logp)
        correct += int((onp.argmax(logp, axis=1) == y[start:start + batch]).sum())
    return losses / len(X), correct / len(X)


def lr_at(lr: float, epoch: int, epochs: int) -> float:
    """Linear decay from ``lr`` to ``lr / 10`` over the run (the same for both libraries)."""
    return lr * (1.0 - 0.9 * epoch / max(epochs - 1, 1))


def train_ours(params, data, epochs, batch, lr, seed, weight_decay=0.0, eps: float = 0.1,
               failures: SkipCounter = None):
    """Adam with a linear learning-rate decay; a step whose forward or backward raises
    a :class:`NimplicitError` is skipped (no update) and counted in ``failures``."""
    Xtr, ytr, Xte, yte = data
    rng = onp.random.default_rng(seed)
    step = value_and_grad(loss_fn)
    failures = SkipCounter() if failures is None else failures
    state, hist, count = None, [], 0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for idx in nn.minibatches(rng, len(Xtr), batch):
            count += 1
            out = guarded_step(step, params, Xtr[idx], ytr[idx], weight_decay, eps,
                               counter=failures, where=f"epoch {epoch + 1} step {count}")
            if out is None:
                print(f"  step {count} skipped ({failures.skipped} so far; first: "
                      f"{failures.first})", flush=True)
                continue
            params, state = nn.adam(params, out[1], lr=lr_at(lr, epoch, epochs), state=state)
        tr, te = evaluate(params, Xtr, ytr, eps=eps), evaluate(params, Xte, yte, eps=eps)
        hist.append({"epoch": epoch + 1, "train_loss": tr[0], "train_acc": tr[1],
                     "test_loss": te[0], "test_acc": te[1], "seconds": time.perf_counter() - t0,
                     "skipped_steps": failures.skipped})
        print(f"[nimplicit] epoch {epoch + 1:2d}: train loss {tr[0]:.4f} acc {tr[1]:.4f} | "
              f"test loss {te[0]:.4f} acc {te[1]:.4f} ({hist[-1]['seconds']:.1f} s, "
              f"{failures.skipped} steps skipped)", flush=True)
    return params, hist


def train_qpth(params0, data, epochs, batch, lr, seed, weight_decay=0.0, eps: float = 0.1):
    """The same model and schedule with qpth's OptNet layer (PyTorch, CPU, float64)."""
    import torch
    from qpth.qp import QPFunction
    torch.set_default_dtype(torch.float64)
    P = {k: torch.tensor(onp.array(v), requires_grad=True) for k, v in
         [("W1", params0["fc1"]["W"]), ("b1", params0["fc1"]["b"]), ("W2", params0["fc2"]["W"]),
          ("b2", params0["fc2"]["b"]), ("L", params0["L"]), ("G", params0["G"]),
          ("z0", params0["z0"]), ("log_s0", params0["log_s0"])]}
    if "A" in params0:
        P["A"] = torch.tensor(onp.array(params0["A"]), requires_grad=True)
    opt = torch.optim.Adam(P.values(), lr=lr)
    e = torch.empty(0)

    def fwd(x):
        q = torch.relu(x @ P["W1"] + P["b1"]) @ P["W2"] + P["b2"]
        n = P["L"].shape[0]
        Q = P["L"] @ P["L"].T + eps * torch.eye(n)
        h = P["G"] @ P["z0"] + torch.exp(P["log_s0"])
        A, b = (P["A"], P["A"] @ P["z0"]) if "A" in P else (e, e)
        return torch.log_softmax(QPFunction(verbose=-1)(Q, q, P["G"], h, A, b), dim=1)

    def ev(X, y):
        with torch.no_grad():
            logp = fwd(torch.tensor(X))
            return (float(torch.nn.functional.nll_loss(logp, torch.tensor(y))),
                    float((logp.argmax(1).numpy() == y).mean()))

    Xtr, ytr, Xte, yte = data
    rng = onp.random.default_rng(seed)
    hist = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(lr, epoch, epochs)
        for idx in nn.minibatches(rng, len(Xtr), batch):
            opt.zero_grad()
            loss = torch.nn.functional.nll_loss(fwd(torch.tensor(Xtr[idx])), torch.tensor(ytr[idx])) \
                + weight_decay * ((P["W1"] ** 2).sum() + (P["W2"] ** 2).sum())
            loss.backward()
            opt.step()
        tr, te = ev(Xtr, ytr), ev(Xte, yte)
        hist.append({"epoch": epoch + 1, "train_loss": tr[0], "train_acc": tr[1],
                     "test_loss": te[0], "test_acc": te[1], "seconds": time.perf_counter() - t0})
        print(f"[qpth]      epoch {epoch + 1:2d}: train loss {tr[0]:.4f} acc {tr[1]:.4f} | "
              f"test loss {te[0]:.4f} acc {te[1]:.4f} ({hist[-1]['seconds']:.1f} s)", flush=True)
    return hist


def plot(histories: dict, path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (name, hist), color in zip(histories.items(), ("C0", "C1")):
        ep = [h["epoch"] for h in hist]
        for split, style in (("train", "--"), ("test", "-")):
            axes[0].plot(ep, [h[f"{split}_loss"] for h in hist], style, color=color,
                         label=f"{name} {split}")
            axes[1].plot(ep, [100 * h[f"{split}_acc"] for h in hist], style, color=color,
                         label=f"{name} {split}")
    axes[0].set(xlabel="epoch", ylabel="NLL loss", title=title, yscale="log")
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)", title=title)
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def qpth_status() -> str:
    """``""`` when qpth's comparison can run, else an accurate reason why not."""
    missing = [name for name in ("torch", "qpth", "cvxpy")
               if importlib.util.find_spec(name) is None]
    if not missing:
        try:
            from qpth.qp import QPFunction  # noqa: F401
        except Exception as exc:        # a broken install: say what failed
            return f"qpth is installed but does not import ({type(exc).__name__}: {exc})"
        return ""
    if missing == ["cvxpy"]:
        return ("qpth and torch are installed but cvxpy is missing (qpth imports it; it was "
                "probably installed with --no-deps): pip install cvxpy")
    return (", ".join(missing) + (" is" if len(missing) == 1 else " are") + " not installed: no "
            "qpth comparison (pip install torch cvxpy; pip install --no-deps qpth)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", metavar="PATH", help="directory with the MNIST IDX files")
    ap.add_argument("--epochs", type=int, default=None, help="default 15 (3 with --quick)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ineq", type=int, default=20, help="number of learned inequalities m")
    ap.add_argument("--eq", type=int, default=0, help="number of learned equalities p")
    ap.add_argument("--eps", type=float, default=0.1, help="Q = LL' + eps I")
    ap.add_argument("--preset", choices=["optnet"], default=None,
                    help="OptNet's MNIST configuration (overrides hidden, ineq, eq, eps, batch, "
                         "lr)")
    ap.add_argument("--out", default=None, help="results folder (default examples/results)")
    ap.add_argument("--weight-decay", type=float, default=0.0,
                    help="L2 penalty on the fully connected weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="3 epochs on a subset (smoke test)")
    ap.add_argument("--no-qpth", action="store_true", help="skip the qpth comparison")
    args = ap.parse_args(argv)
    if args.preset == "optnet":
        # the preset replaces the defaults; options given on the command line still win
        ap.set_defaults(**OPTNET_PRESET)
        args = ap.parse_args(argv)
    if args.epochs is None:
        args.epochs = 3 if args.quick else 15
    if args.eq and not args.ineq:
        check_equality_only(10)
    # learned QPs routinely have a few weakly active constraints in a batch; the layer
    # uses the minimum-norm convention there (as OptNet's interior point gradient does,
    # in effect): one warning per step would drown the log
    warnings.simplefilter("ignore", ImplicitGradientWarning)

    data = load_mnist(args.mnist) if args.mnist else load_digits_split(args.seed)
    name = "mnist" if args.mnist else "digits"
    Xtr, Xte = standardize(data[0], data[2])
    data = (Xtr, data[1], Xte, data[3])
    if args.quick:
        data = (data[0][:600], data[1][:600], data[2][:300], data[3][:300])
    rng = onp.random.default_rng(args.seed)
    params0 = init_params(rng, data[0].shape[1], args.hidden, 10, args.ineq)
    params0 = init_equalities(rng, params0, args.eq)
    print(f"{name}: {len(data[0])} train / {len(data[2])} test images, QP with n=10, "
          f"m={args.ineq}, p={args.eq}, eps={args.eps:g}, batch {args.batch}, "
          f"{args.epochs} epochs", flush=True)
    example = "qp_digits" if name == "digits" else "qp_mnist"
    out = Results("qp_digits", args, args.seed, out_dir=args.out)
    # MNIST, preset and quick runs get their own file: never the default run's
    out.stem = example + (f"-{args.preset}" if args.preset else "") + ("-quick" if args.quick else "")
    out.set_command(argv)
    failures = SkipCounter()
    t0 = time.perf_counter()
    _, ours = train_ours(params0, data, args.epochs, args.batch, args.lr, args.seed,
                         args.weight_decay, args.eps, failures)
    histories = {"nimplicit qp_layer": ours}
    timing = {"nimplicit_seconds": time.perf_counter() - t0}
    qpth_note = "skipped (--no-qpth)" if args.no_qpth else qpth_status()
    if qpth_note:
        print(f"qpth comparison: {qpth_note}", flush=True)
    else:
        t0 = time.perf_counter()
        histories["qpth QPFunction"] = train_qpth(params0, data, args.epochs, args.batch,
                                                  args.lr, args.seed, args.weight_decay,
                                                  args.eps)
        timing["qpth_seconds"] = time.perf_counter() - t0
    if plot(histories, out.figure_path("curves"), f"QP layer on {name}"):
        print(f"plot: {out.data['figures'][-1]}")
    final = ours[-1]["test_acc"]
    rows = [(f"test accuracy, nimplicit ({args.epochs} epochs)", f"{100 * final:.2f}%",
             PAPER["test_accuracy"])]
    if "qpth QPFunction" in histories:
        rows.append((f"test accuracy, qpth ({args.epochs} epochs)",
                     f"{100 * histories['qpth QPFunction'][-1]['test_acc']:.2f}%",
                     PAPER["test_accuracy"]))
    rows.append(("training steps skipped (typed failure)", str(failures.skipped), "-"))
    differences = [DIFFERENCES[name], DIFFERENCES["model"]]
    print("\nbeside the paper:\n" + paper_table(rows))
    for line in differences:
        print("  difference: " + line)
    print(f"final test accuracy (nimplicit): {100 * final:.2f}%  "
          f"({timing['nimplicit_seconds']:.0f} s)")
    out.data["metrics"] = {"final_test_accuracy": final, "final_train_accuracy":
                           ours[-1]["train_acc"], "histories": histories, **timing,
                           "skipped_steps": failures.skipped, "failures": failures.as_dict(),
                           "qpth": qpth_note or "ran"}
    out.data["paper"] = PAPER
    out.data["differences"] = differences
    out.data["table"] = paper_table(rows)
    path = out.write()
    print(f"results: {path}", flush=True)
    return histories


if __name__ == "__main__":
    main()
