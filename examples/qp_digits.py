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

Usage::

    PYTHONPATH=. python examples/qp_digits.py            # digits, 15 epochs
    PYTHONPATH=. python examples/qp_digits.py --quick    # a smoke run
    PYTHONPATH=. python examples/qp_digits.py --mnist ~/data/mnist --epochs 5
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import time
import warnings

import autograd.numpy as np
import numpy as onp
from autograd import value_and_grad

from nimplicit import nn
from nimplicit.errors import ImplicitGradientWarning
from reference_layers.qp import qp_layer

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")


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


def _read_idx(path: str) -> onp.ndarray:
    for candidate in (path, path + ".gz"):
        if os.path.exists(candidate):
            opener = gzip.open if candidate.endswith(".gz") else open
            with opener(candidate, "rb") as f:
                data = f.read()
            ndim = data[3]
            shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
            return onp.frombuffer(data, dtype=onp.uint8, offset=4 + 4 * ndim).reshape(shape)
    raise FileNotFoundError(f"no IDX file {path}(.gz); --mnist expects a directory with "
                            f"train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                            f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte")


def load_mnist(root: str):
    r = lambda name: _read_idx(os.path.join(os.path.expanduser(root), name))
    Xtr = r("train-images-idx3-ubyte").reshape(-1, 784) / 255.0
    Xte = r("t10k-images-idx3-ubyte").reshape(-1, 784) / 255.0
    return Xtr, r("train-labels-idx1-ubyte").astype(int), Xte, r("t10k-labels-idx1-ubyte").astype(int)


# ----------------------------------------------------------------------------- model

def init_params(rng, n_in: int, n_hidden: int, n_cls: int, n_ineq: int) -> dict:
    return {"fc1": nn.dense_init(rng, n_in, n_hidden),
            "fc2": nn.dense_init(rng, n_hidden, n_cls),
            "L": onp.tril(rng.uniform(0.0, 1.0, (n_cls, n_cls))) / onp.sqrt(n_cls),
            "G": rng.uniform(-1.0, 1.0, (n_ineq, n_cls)) / onp.sqrt(n_cls),
            "z0": onp.zeros(n_cls),
            "log_s0": onp.zeros(n_ineq)}


def qp_data(params: dict, eps: float):
    L = params["L"]
    Q = np.dot(L, L.T) + eps * np.eye(L.shape[0])
    G = params["G"]
    h = np.dot(G, params["z0"]) + np.exp(params["log_s0"])
    return Q, G, h


def forward(params: dict, x, eps: float = 0.1):
    q = nn.dense(params["fc2"], nn.relu(nn.dense(params["fc1"], x)))
    Q, G, h = qp_data(params, eps)
    return nn.log_softmax(qp_layer(Q, q, G, h))


def loss_fn(params, x, labels, weight_decay: float = 0.0):
    """NLL plus ``weight_decay * (|W1|^2 + |W2|^2)`` on the fully connected weights."""
    reg = weight_decay * (np.sum(params["fc1"]["W"] ** 2) + np.sum(params["fc2"]["W"] ** 2))
    return nn.nll_loss(forward(params, x), labels) + reg


def evaluate(params, X, y, batch: int = 500):
    losses, correct = 0.0, 0
    for start in range(0, len(X), batch):
        logp = forward(params, X[start:start + batch])
        losses += float(nn.nll_loss(logp, y[start:start + batch])) * len(logp)
        correct += int((onp.argmax(logp, axis=1) == y[start:start + batch]).sum())
    return losses / len(X), correct / len(X)


def lr_at(lr: float, epoch: int, epochs: int) -> float:
    """Linear decay from ``lr`` to ``lr / 10`` over the run (the same for both libraries)."""
    return lr * (1.0 - 0.9 * epoch / max(epochs - 1, 1))


def train_ours(params, data, epochs, batch, lr, seed, weight_decay=0.0):
    Xtr, ytr, Xte, yte = data
    rng = onp.random.default_rng(seed)
    step = value_and_grad(loss_fn)
    state, hist = None, []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for idx in nn.minibatches(rng, len(Xtr), batch):
            _, g = step(params, Xtr[idx], ytr[idx], weight_decay)
            params, state = nn.adam(params, g, lr=lr_at(lr, epoch, epochs), state=state)
        tr, te = evaluate(params, Xtr, ytr), evaluate(params, Xte, yte)
        hist.append({"epoch": epoch + 1, "train_loss": tr[0], "train_acc": tr[1],
                     "test_loss": te[0], "test_acc": te[1], "seconds": time.perf_counter() - t0})
        print(f"[nimplicit] epoch {epoch + 1:2d}: train loss {tr[0]:.4f} acc {tr[1]:.4f} | "
              f"test loss {te[0]:.4f} acc {te[1]:.4f} ({hist[-1]['seconds']:.1f} s)", flush=True)
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
    opt = torch.optim.Adam(P.values(), lr=lr)
    e = torch.empty(0)

    def fwd(x):
        q = torch.relu(x @ P["W1"] + P["b1"]) @ P["W2"] + P["b2"]
        n = P["L"].shape[0]
        Q = P["L"] @ P["L"].T + eps * torch.eye(n)
        h = P["G"] @ P["z0"] + torch.exp(P["log_s0"])
        return torch.log_softmax(QPFunction(verbose=-1)(Q, q, P["G"], h, e, e), dim=1)

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", metavar="PATH", help="directory with the MNIST IDX files")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ineq", type=int, default=20, help="number of learned inequalities m")
    ap.add_argument("--weight-decay", type=float, default=0.0,
                    help="L2 penalty on the fully connected weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="3 epochs on a subset (smoke test)")
    ap.add_argument("--no-qpth", action="store_true", help="skip the qpth comparison")
    args = ap.parse_args(argv)
    # learned QPs routinely have a few weakly active constraints in a batch; the layer
    # uses the minimum-norm convention there (as OptNet's interior point gradient does,
    # in effect): one warning per step would drown the log
    warnings.simplefilter("ignore", ImplicitGradientWarning)

    data = load_mnist(args.mnist) if args.mnist else load_digits_split(args.seed)
    name = "mnist" if args.mnist else "digits"
    Xtr, Xte = standardize(data[0], data[2])
    data = (Xtr, data[1], Xte, data[3])
    if args.quick:
        args.epochs = 3
        data = (data[0][:600], data[1][:600], data[2][:300], data[3][:300])
    params0 = init_params(onp.random.default_rng(args.seed), data[0].shape[1], args.hidden, 10,
                          args.ineq)
    print(f"{name}: {len(data[0])} train / {len(data[2])} test images, QP with n=10, "
          f"m={args.ineq}, batch {args.batch}, {args.epochs} epochs")
    t0 = time.perf_counter()
    _, ours = train_ours(params0, data, args.epochs, args.batch, args.lr, args.seed,
                         args.weight_decay)
    histories = {"nimplicit qp_layer": ours}
    timing = {"nimplicit_seconds": time.perf_counter() - t0}
    if not args.no_qpth:
        try:
            import qpth  # noqa: F401
            import torch  # noqa: F401
        except ImportError:
            print("qpth/torch not installed: no comparison (pip install the bench extra)")
        else:
            t0 = time.perf_counter()
            histories["qpth QPFunction"] = train_qpth(params0, data, args.epochs, args.batch,
                                                      args.lr, args.seed, args.weight_decay)
            timing["qpth_seconds"] = time.perf_counter() - t0
    os.makedirs(OUT, exist_ok=True)
    tag = f"qp_{name}{'_quick' if args.quick else ''}"
    with open(os.path.join(OUT, f"{tag}.json"), "w") as f:
        json.dump({"args": vars(args), "histories": histories, **timing}, f, indent=1)
    if plot(histories, os.path.join(OUT, f"{tag}.png"), f"QP layer on {name}"):
        print(f"plot: {os.path.join(OUT, tag + '.png')}")
    final = ours[-1]["test_acc"]
    print(f"final test accuracy (nimplicit): {100 * final:.2f}%  "
          f"({timing['nimplicit_seconds']:.0f} s)")
    if "qpth QPFunction" in histories:
        print(f"final test accuracy (qpth):      "
              f"{100 * histories['qpth QPFunction'][-1]['test_acc']:.2f}%  "
              f"({timing['qpth_seconds']:.0f} s)")
    return histories


if __name__ == "__main__":
    main()
