"""Shared invariant checker and counters of the hostile-input (fuzz) suite.

Every fuzz example is a *case*: an entry point name, a bad-input class, a
thunk that calls the public entry point on one hostile input, and optionally
a gradient check.  :func:`run_case` runs the thunk under a SIGALRM time bound
and classifies what happened:

``typed``
    a :class:`nimplicit.errors.NimplicitError` whose message is a sentence
    (at least ``MIN_MESSAGE`` characters) and, when the case names words the
    message must contain (``expect_words``), contains one of them;
``documented``
    a result whose every float entry is finite and, when the case gives a
    gradient check, whose derivatives agree with finite differences of the
    forward's actual output (:func:`verification.check_grad`);
``user``
    an exception raised by the user's own callable (residual, objective,
    solver, defined in the tests) and passed through unchanged;
``failure``
    anything else: an untyped exception (``untyped:<Type>``), a non-finite
    output (``nan``), a gradient that disagrees with finite differences
    (``wrong-gradient``), a typed error with a message that does not name the
    problem (``vague-message``), numpy's ComplexWarning (a silent complex cast,
    ``complex-cast``), an ``accepted`` bad input that must be refused, or a
    time-out (``hang``).

The invariant of the suite is ``failure == 0``.  Outcomes are accumulated in
:data:`COUNTS` (entry point -> class -> outcome -> count) so that
``benchmarks/fuzz_counts.py`` can print the table after running the suite.

Set ``FUZZ_NO_ASSERT=1`` to record outcomes without failing (the counts
script does, so that every example is counted instead of hypothesis stopping
at the first failure).
"""
from __future__ import annotations

import os
import signal
import threading
import traceback
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from nimplicit.errors import NimplicitError

TIME_LIMIT = 20          # seconds per example (forward + gradient check)
MIN_MESSAGE = 20         # a message shorter than this does not explain anything

#: entry point -> bad-input class -> outcome ("typed", "documented", "failure:<kind>") -> count
COUNTS: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
#: first example of each (entry, class, failure kind): its description and the error text
FAILURES: dict = {}
#: entry point -> bad-input class -> typed error class name -> count (what a typed outcome raised)
ERRORS: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))


class FuzzTimeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so library code's
    ``except Exception`` cannot swallow it."""


@contextmanager
def time_limit(seconds: int):
    """Raise :class:`FuzzTimeout` after ``seconds`` (main thread only; elsewhere no bound)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise FuzzTimeout(f"example exceeded {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Case:
    """One hostile example.

    Parameters
    ----------
    entry : name of the public entry point (a row of the counts table).
    klass : the bad-input class (``"nan"``, ``"dtype:complex"``, ``"scale:1e150"``...).
    call : thunk calling the entry point; its return value is the result.
    grad : optional ``grad(result) -> GradCheckReport | bool``: the gradient
        check of a documented result (run only when ``call`` returned).
    expect_words : when a typed error is raised, its message must contain one
        of these (case-insensitive); empty means any message of MIN_MESSAGE chars.
    must_raise : the input is invalid, so a result is a failure (``accepted``)
        even when finite (e.g. an infeasible problem returning a point).
    must_succeed : the input is valid and well posed (a layout, a rescaling of
        a good problem), so a typed error is a false refusal (``refused``).
    describe : a one-line description for failure reports.
    """
    entry: str
    klass: str
    call: Callable[[], Any]
    grad: Optional[Callable[[Any], Any]] = None
    expect_words: Sequence[str] = ()
    must_raise: bool = False
    describe: str = ""
    must_succeed: bool = False


@dataclass
class Outcome:
    kind: str                        # "typed", "documented" or "failure:<why>"
    detail: str = ""
    warnings: list = field(default_factory=list)
    error: str = ""                  # the typed error's class name ("typed" outcomes)

    @property
    def failed(self) -> bool:
        return self.kind.startswith("failure")


def _leaves(value):
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


def non_finite_leaf(value) -> Optional[str]:
    """Describe the first float/complex leaf of ``value`` with NaN or Inf, else None."""
    from autograd.tracer import getval
    for k, leaf in enumerate(_leaves(value)):
        try:
            arr = np.asarray(getval(leaf))
        except Exception:                      # noqa: BLE001 - opaque objects are not numbers
            continue
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            return f"output leaf {k} (shape {arr.shape}) has {int((~np.isfinite(arr)).sum())} non-finite entries"
    return None


_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS_DIR)


def raised_in_user_code(tb) -> bool:
    """True when the innermost project frame of ``tb`` is in the tests (the
    user's residual, objective or solver): the library passed the user's own
    exception through unchanged, which is not a crash inside the library."""
    for frame in reversed(tb):
        path = os.path.abspath(frame.filename)
        if path.startswith(_ROOT) and "site-packages" not in path:
            return path.startswith(_TESTS_DIR)
    return False


def classify(case: Case) -> Outcome:
    """Run ``case`` (time-bounded) and return its :class:`Outcome`."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught, time_limit(TIME_LIMIT):
            warnings.simplefilter("always")
            try:
                result = case.call()
            except NimplicitError as err:
                msg = str(err)
                if case.must_succeed:
                    return Outcome("failure:refused", f"{type(err).__name__} on a valid input: {msg[:300]}")
                if len(msg) < MIN_MESSAGE:
                    return Outcome("failure:vague-message", f"{type(err).__name__}: {msg!r}")
                if case.expect_words and not any(w.lower() in msg.lower() for w in case.expect_words):
                    return Outcome("failure:vague-message",
                                   f"{type(err).__name__} without any of {list(case.expect_words)}: {msg}")
                return Outcome("typed", f"{type(err).__name__}: {msg[:160]}", error=type(err).__name__)
            except FuzzTimeout:
                raise
            except Exception as err:          # noqa: BLE001 - the point is to catch them
                tb = traceback.extract_tb(err.__traceback__)
                where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
                if raised_in_user_code(tb):
                    return Outcome("user", f"{type(err).__name__} from the user's callable: {err!s:.200}")
                return Outcome(f"failure:untyped:{type(err).__name__}", f"{err!s:.300} at {where}")
            complex_cast = [w for w in caught if "ComplexWarning" in type(w.message).__name__
                            or issubclass(w.category, getattr(np.exceptions, "ComplexWarning", ()))]
            if complex_cast:
                return Outcome("failure:complex-cast", str(complex_cast[0].message))
            bad = non_finite_leaf(result)
            if bad:
                return Outcome("failure:nan", bad)
            if case.must_raise:
                return Outcome("failure:accepted", "a bad input returned a result instead of a typed error")
            if case.grad is not None:
                try:
                    report = case.grad(result)
                except NimplicitError as err:
                    # the forward was fine; a typed refusal of the backward is still loud
                    msg = str(err)
                    if case.must_succeed:
                        return Outcome("failure:refused",
                                       f"backward {type(err).__name__} on a valid input: {msg[:300]}")
                    if len(msg) < MIN_MESSAGE:
                        return Outcome("failure:vague-message", f"backward {type(err).__name__}: {msg!r}")
                    return Outcome("typed", f"backward {type(err).__name__}: {msg[:160]}",
                                   error=f"{type(err).__name__} (backward)")
                except FuzzTimeout:
                    raise
                except Exception as err:      # noqa: BLE001
                    tb = traceback.extract_tb(err.__traceback__)
                    where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
                    return Outcome(f"failure:untyped-backward:{type(err).__name__}",
                                   f"{err!s:.300} at {where}")
                if not bool(report):
                    return Outcome("failure:wrong-gradient", str(report)[:600])
            return Outcome("documented", "")
    except FuzzTimeout as err:
        return Outcome("failure:hang", str(err))


def run_case(case: Case) -> Outcome:
    """Classify ``case``, record it in :data:`COUNTS`, and assert (unless
    ``FUZZ_NO_ASSERT`` is set) that it is not a failure."""
    out = classify(case)
    COUNTS[case.entry][case.klass][out.kind] += 1
    if out.error:
        ERRORS[case.entry][case.klass][out.error] += 1
    if out.failed:
        FAILURES.setdefault((case.entry, case.klass, out.kind), f"{case.describe}: {out.detail}")
        if not os.environ.get("FUZZ_NO_ASSERT"):
            raise AssertionError(f"[{case.entry} / {case.klass}] {out.kind}: {case.describe}\n{out.detail}")
    return out


def grad_check(fn: Callable, *inputs, argnums=None, **kw):
    """A cheap :func:`verification.check_grad` (reverse mode, one direction)
    for a documented result: ``fn(*inputs)`` is the layer on raw inputs."""
    from verification import check_grad
    kw.setdefault("modes", ("rev",))
    kw.setdefault("n_directions", 1)
    kw.setdefault("full_jacobian_max", 0)
    return check_grad(fn, *inputs, argnums=argnums, **kw)


def rescaled(fn: Callable, in_scales: Sequence[float], out_scale: float) -> Callable:
    """``x0 -> fn(s_0 x0_0, s_1 x0_1, ...) / out_scale``: finite differences on
    O(1) inputs ``x0`` then perturb the layer's inputs *relatively*, so the
    layer's gradient at an extreme scale is checked without asking the finite
    differences to resolve steps of 1e-150 or 1e150."""
    import autograd.numpy as anp

    from autograd.builtins import tuple as ag_tuple
    from autograd.tracer import getval

    def wrapped(*x0):
        out = fn(*[s * x for s, x in zip(in_scales, x0)])
        if isinstance(getval(out), (tuple, list)):
            return ag_tuple(out[k] / out_scale for k in range(len(getval(out))))
        return out / out_scale
    return wrapped


# ------------------------------------------------------------------------------
# hostile array transformations
# ------------------------------------------------------------------------------

NONFINITE = (np.nan, np.inf, -np.inf)
BAD_DTYPES = ("float16", "float32", "int64", "complex128", "object", "bool")
NONFINITE_WORDS = ("nan", "inf", "finite")


def put_nonfinite(x: np.ndarray, index: int, value: float) -> np.ndarray:
    """A float copy of ``x`` with ``value`` at flat ``index % x.size``."""
    y = np.array(x, dtype=float, copy=True)
    if y.size:
        y.flat[index % y.size] = value
    return y


def as_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` cast to a hostile dtype; complex gets a non-zero imaginary part."""
    x = np.asarray(x, dtype=float)
    if dtype == "complex128":                    # a real layer must refuse it (issue 11 item 7)
        return x + 1e-3j
    if dtype == "int64":
        return np.round(x * 3).astype(np.int64)
    if dtype == "bool":
        return x > np.median(x) if x.size else x.astype(bool)
    if dtype == "object":
        return x.astype(object)
    return x.astype(dtype)


def non_contiguous(x: np.ndarray) -> np.ndarray:
    """The same values as ``x`` in a non-contiguous (strided) view."""
    x = np.asarray(x, dtype=float)
    big = np.zeros(x.shape + (2,), dtype=float)
    big[..., 0] = x
    view = big[..., 0]
    assert not view.flags["C_CONTIGUOUS"] or x.size <= 1
    return view


def read_only(x: np.ndarray) -> np.ndarray:
    """A read-only copy of ``x``."""
    y = np.array(x, dtype=float, copy=True)
    y.flags.writeable = False
    return y


def fortran(x: np.ndarray) -> np.ndarray:
    return np.asfortranarray(np.asarray(x, dtype=float))


LAYOUTS = {"non-contiguous": non_contiguous, "read-only": read_only, "fortran": fortran}


def summary_rows(counts=None):
    """``[(entry, tried, typed, documented, failures, {failure kind: n}, {class: n failed}, user)]``."""
    counts = COUNTS if counts is None else counts
    rows = []
    for entry in sorted(counts):
        tried = typed = documented = failures = user = 0
        kinds: dict = defaultdict(int)
        classes: dict = defaultdict(int)
        for klass, outcomes in counts[entry].items():
            for kind, n in outcomes.items():
                tried += n
                if kind == "typed":
                    typed += n
                elif kind == "documented":
                    documented += n
                elif kind == "user":
                    user += n
                else:
                    failures += n
                    kinds[kind.split(":", 1)[1]] += n
                    classes[klass] += n
        rows.append((entry, tried, typed, documented, failures, dict(kinds), dict(classes), user))
    return rows


def format_table(counts=None) -> str:
    lines = [f"{'entry point':<28} {'tried':>6} {'typed':>6} {'docum.':>6} {'user':>5} {'fail':>5}  "
             f"failing classes"]
    total = [0, 0, 0, 0, 0]
    for entry, tried, typed, documented, failures, kinds, classes, user in summary_rows(counts):
        total = [a + b for a, b in zip(total, (tried, typed, documented, user, failures))]
        where = ", ".join(f"{k}x{n}" for k, n in sorted(classes.items()))
        why = ", ".join(f"{k}x{n}" for k, n in sorted(kinds.items()))
        lines.append(f"{entry:<28} {tried:>6} {typed:>6} {documented:>6} {user:>5} {failures:>5}  "
                     f"{where}{' [' + why + ']' if why else ''}")
    lines.append(f"{'TOTAL':<28} {total[0]:>6} {total[1]:>6} {total[2]:>6} {total[3]:>5} {total[4]:>5}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------
# pytest + hypothesis glue
# ------------------------------------------------------------------------------

PER_CLASS_DEFAULT = int(os.environ.get("FUZZ_PER_CLASS", "2"))
PER_CLASS_SLOW = int(os.environ.get("FUZZ_PER_CLASS_SLOW", "25"))


_WARMED: set = set()


def hostile_tests(entry: str, builders: dict, xfail: Optional[dict] = None,
                  warm_up: Optional[Callable[[], Any]] = None):
    """Two pytest functions over every bad-input class of ``entry``.

    ``builders[klass](rng, draw) -> Case`` builds one example from a seeded
    generator and hypothesis' ``draw``.  The default test runs
    ``PER_CLASS_DEFAULT`` derandomized examples per class, the ``slow`` one
    ``PER_CLASS_SLOW`` random ones.  ``xfail`` maps a class to the reason of a
    known open defect (strict: the test fails once it is fixed).  ``warm_up()``
    runs once, outside the time bound, before the first example: numba's
    first compilation of a kernel is not a hang (and a SIGALRM inside it
    would corrupt numba's state).
    """
    import pytest
    from hypothesis import HealthCheck, given, settings, strategies as st, Phase

    xfail = xfail or {}
    params = [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=xfail[k]))
              if k in xfail else k for k in sorted(builders)]

    def body(klass, data):
        if warm_up is not None and entry not in _WARMED:
            _WARMED.add(entry)
            try:
                warm_up()
            except Exception:                 # noqa: BLE001 - the examples themselves count it
                pass
        seed = data.draw(st.integers(0, 2 ** 32 - 1), label="seed")
        case = builders[klass](np.random.default_rng(seed), data.draw)
        case.entry, case.klass = entry, klass
        case.describe = f"{case.describe} [rng seed {seed}]"
        run_case(case)

    common = dict(deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))

    @pytest.mark.parametrize("klass", params)
    @settings(max_examples=PER_CLASS_DEFAULT, derandomize=True, **common)
    @given(data=st.data())
    def test_default(klass, data):
        body(klass, data)

    @pytest.mark.slow
    @pytest.mark.parametrize("klass", params)
    @settings(max_examples=PER_CLASS_SLOW, **common)
    @given(data=st.data())
    def test_slow(klass, data):
        body(klass, data)

    return test_default, test_slow


def case(call: Callable[[], Any], *, grad=None, words: Sequence[str] = (), must_raise: bool = False,
         must_succeed: bool = False, describe: str = "") -> Case:
    """A :class:`Case` whose entry and class :func:`hostile_tests` fills in."""
    assert not (must_raise and must_succeed)
    return Case("", "", call, grad=grad, expect_words=tuple(words), must_raise=must_raise,
                describe=describe, must_succeed=must_succeed)


#: dtypes a one-input layer may read as float64 (then its gradient must be right)
FLOAT_READABLE = ("float16", "float32", "int64")


def nonfinite_case(layer: Callable, x: np.ndarray, index: int, value: float, name: str) -> Case:
    """``layer(x)`` with ``value`` (NaN or +-Inf) at flat ``index`` of ``x``: a
    typed error naming the non-finite input (or a finite result)."""
    bad = put_nonfinite(x, index, value)
    return case(lambda: layer(bad), words=NONFINITE_WORDS, describe=f"{name} x={bad}")


def dtype_case(layer: Callable, x: np.ndarray, dtype: str, name: str, *,
               differentiated: Optional[Callable] = None, noise: Optional[float] = None) -> Case:
    """``layer(x)`` with ``x`` cast to ``dtype`` (:func:`as_dtype`): complex must be
    refused; the :data:`FLOAT_READABLE` ones may be read as float64, and then the
    gradient of ``differentiated`` (default ``layer``) at the float64 values is checked."""
    cast = as_dtype(x, dtype)
    target = layer if differentiated is None else differentiated
    grad = (lambda out: grad_check(target, np.asarray(cast, float), noise=noise)) \
        if dtype in FLOAT_READABLE else None
    return case(lambda: layer(cast), grad=grad, must_raise=(dtype == "complex128"),
                describe=f"{name} x as {dtype}")


def format_class_table(counts=None) -> str:
    """Per entry point and bad-input class, what it got: ``typed n / documented n /
    <failure kind> n`` (the material of the docs' bad-input table)."""
    counts = COUNTS if counts is None else counts
    lines = [f"{'entry point':<28} {'class':<22} outcomes"]
    for entry in sorted(counts):
        for klass in sorted(counts[entry]):
            got = ", ".join(f"{k} {n}" for k, n in sorted(counts[entry][klass].items()))
            lines.append(f"{entry:<28} {klass:<22} {got}")
    return "\n".join(lines)
