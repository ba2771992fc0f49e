r"""Adapters from PyTorch and JAX functions to the oracle's wrapper protocol.

:func:`compare` (and :func:`verification.testing.assert_matches_oracle`) take
``fn(*numpy inputs) -> numpy output(s)`` with ``vjp(inputs, cotangent)`` and
``jvp(inputs, tangent)``.  :func:`torch_adapter` and :func:`jax_adapter` build
that from a function of the framework's arrays; the frameworks are imported
only when an adapter is made (neither is a dependency of nimplicit).

- torch: values in float64; VJP by ``torch.autograd.grad`` (an input that does
  not influence the output gets a zero cotangent); JVP by ``torch.func.jvp``
  when the function supports forward mode, otherwise the adapter's ``jvp``
  raises :class:`JVPUnavailable` and ``compare`` checks the JVPs through the
  peer's VJPs and the stored pairs, :math:`\langle u, J t\rangle = \langle J^\top u, t\rangle`
  (qpth and cvxpylayers have no forward mode).
- JAX: ``jax_enable_x64`` is switched on; VJP by ``jax.vjp``, JVP by ``jax.jvp``.
"""
from __future__ import annotations

from typing import Any, Callable, List, Sequence

import importlib

import numpy as np
from nimplicit.errors import NimplicitError, UnsupportedError
from nimplicit.structure import substitute


class JVPUnavailable(UnsupportedError):
    """The peer has no forward mode; compare falls back on the adjoint identity."""


class AdapterError(NimplicitError, ValueError):
    """An unknown framework, or a framework that is not installed."""


def _to_numpy_out(out):
    if isinstance(out, (tuple, list)):
        return tuple(np.asarray(_np(o), dtype=float) for o in out)
    return np.asarray(_np(out), dtype=float)


def _np(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _import(framework: str, module: str):
    """The framework's module, or :class:`AdapterError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:   # pragma: no cover - depends on the environment
        raise AdapterError(f"framework={framework!r} needs {module} installed (the 'bench' extra)") \
            from exc


def _of_selected(fn: Callable, full: Sequence[Any], argnums: Sequence[int]) -> Callable:
    """``sel -> fn(*full with full[argnums[k]] = sel[k])``: the function of the
    differentiated inputs alone (a list output becomes a tuple), for ``jvp``/``vjp``."""
    def of_selected(*sel):
        out = fn(*substitute(full, argnums, sel))
        return tuple(out) if isinstance(out, list) else out
    return of_selected


class TorchAdapter:
    """The wrapper protocol for ``fn(*torch tensors) -> tensor or tuple of tensors``."""

    framework = "torch"

    def __init__(self, fn: Callable, argnums: Sequence[int]):
        self.torch, self.fn, self.argnums = _import("torch", "torch"), fn, list(argnums)
        self.jvp_error: str = ""

    def _tensors(self, inputs, grad: bool = False) -> List[Any]:
        t = [self.torch.as_tensor(np.asarray(x, dtype=float), dtype=self.torch.float64)
             for x in inputs]
        if grad:
            for i in self.argnums:
                t[i] = t[i].clone().requires_grad_(True)
        return t

    def __call__(self, *inputs):
        with self.torch.no_grad():
            return _to_numpy_out(self.fn(*self._tensors(inputs)))

    def vjp(self, inputs, cotangent):
        torch = self.torch
        t = self._tensors(inputs, grad=True)
        outs = _as_tuple(self.fn(*t))
        cots = [torch.as_tensor(np.asarray(c, float), dtype=o.dtype).reshape(o.shape)
                for c, o in zip(_as_tuple(cotangent), outs)]
        pairs = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]
        sel = [t[i] for i in self.argnums]
        if not pairs:
            return tuple(np.zeros(np.shape(inputs[i])) for i in self.argnums)
        grads = torch.autograd.grad([o for o, _ in pairs], sel, grad_outputs=[c for _, c in pairs],
                                    allow_unused=True)
        return tuple(np.zeros(np.shape(inputs[i])) if g is None else g.detach().numpy().reshape(
            np.shape(inputs[i])) for i, g in zip(self.argnums, grads))

    def jvp(self, inputs, tangent):
        torch = self.torch
        t = self._tensors(inputs)
        primals = tuple(t[i] for i in self.argnums)
        tangents = tuple(torch.as_tensor(np.asarray(v, float), dtype=torch.float64) for v in tangent)
        try:
            _, out = torch.func.jvp(_of_selected(self.fn, t, self.argnums), primals, tangents)
        except Exception as exc:
            self.jvp_error = f"{type(exc).__name__}: {exc}"[:200]
            raise JVPUnavailable(f"torch.func.jvp does not run through this function "
                                 f"({self.jvp_error}); JVPs are checked through its VJPs") from exc
        return _to_numpy_out(out)


class JaxAdapter:
    """The wrapper protocol for ``fn(*jax arrays) -> array or tuple of arrays``."""

    framework = "jax"

    def __init__(self, fn: Callable, argnums: Sequence[int]):
        jax = _import("jax", "jax")
        jax.config.update("jax_enable_x64", True)
        self.jax, self.fn, self.argnums = jax, fn, list(argnums)

    def _arrays(self, inputs):
        jnp = self.jax.numpy
        return [jnp.asarray(np.asarray(x, dtype=float)) for x in inputs]

    def __call__(self, *inputs):
        return _to_numpy_out(self.fn(*self._arrays(inputs)))

    def vjp(self, inputs, cotangent):
        full = self._arrays(inputs)
        out, back = self.jax.vjp(_of_selected(self.fn, full, self.argnums),
                                 *[full[i] for i in self.argnums])
        jnp = self.jax.numpy
        cot = tuple(jnp.asarray(c, dtype=o.dtype) for c, o in zip(cotangent, out)) \
            if isinstance(out, tuple) else jnp.asarray(cotangent, dtype=out.dtype)
        return tuple(np.asarray(g, dtype=float) for g in back(cot))

    def jvp(self, inputs, tangent):
        full = self._arrays(inputs)
        jnp = self.jax.numpy
        try:
            _, out = self.jax.jvp(_of_selected(self.fn, full, self.argnums),
                                  tuple(full[i] for i in self.argnums),
                                  tuple(jnp.asarray(np.asarray(v, float)) for v in tangent))
        except Exception as exc:     # e.g. a custom_vjp function has no forward mode
            raise JVPUnavailable(f"jax.jvp does not run through this function "
                                 f"({type(exc).__name__}: {str(exc)[:160]}); JVPs are checked "
                                 f"through its VJPs") from exc
        return _to_numpy_out(out)


def torch_adapter(fn: Callable, argnums: Sequence[int]) -> TorchAdapter:
    """Wrap a function of torch tensors (see the module doc)."""
    return TorchAdapter(fn, argnums)


def jax_adapter(fn: Callable, argnums: Sequence[int]) -> JaxAdapter:
    """Wrap a function of JAX arrays (see the module doc)."""
    return JaxAdapter(fn, argnums)


def wrap(fn: Callable, argnums: Sequence[int], *, framework: str):
    """``torch_adapter`` or ``jax_adapter`` by name."""
    if framework == "torch":
        return torch_adapter(fn, argnums)
    if framework == "jax":
        return jax_adapter(fn, argnums)
    raise AdapterError(f"framework must be 'torch' or 'jax', got {framework!r}")
