"""The fuzz harness' classifier can fail: each failure kind is recognised
(untyped exception, NaN, wrong gradient, vague message, accepted bad input,
refused good input, silent complex cast, hang), and the good outcomes too."""
from __future__ import annotations

import os
import time

import autograd.numpy as anp
import numpy as np
import pytest
from autograd.extend import defvjp, primitive

import fuzz_harness as H
from nimplicit.errors import NonFiniteError


@primitive
def _wrong_sin(x):
    return anp.sin(x)


defvjp(_wrong_sin, lambda ans, x: lambda g: 1.2 * g * anp.cos(x))


def _kind(**kw):
    return H.classify(H.Case("e", "k", **kw)).kind


def test_good_outcomes():
    x = np.linspace(0.1, 1.0, 3)
    assert _kind(call=lambda: anp.sin(x), grad=lambda y: H.grad_check(anp.sin, x)) == "documented"
    msg = "the input contains NaN at index 0; remove it"
    assert _kind(call=lambda: (_ for _ in ()).throw(NonFiniteError(msg)), expect_words=("nan",)) == "typed"


def test_failure_kinds():
    x = np.linspace(0.1, 1.0, 3)
    # a plain exception raised inside the library (not in the caller's code) is a crash
    in_library = compile("1 / 0", os.path.join(H._ROOT, "nimplicit", "_pretend.py"), "exec")
    assert _kind(call=lambda: exec(in_library)) == "failure:untyped:ZeroDivisionError"
    assert _kind(call=lambda: np.array([1.0, np.nan])) == "failure:nan"
    assert _kind(call=lambda: _wrong_sin(x), grad=lambda y: H.grad_check(_wrong_sin, x)) == \
        "failure:wrong-gradient"
    assert _kind(call=lambda: (_ for _ in ()).throw(NonFiniteError("bad"))) == "failure:vague-message"
    long = "a long message that never says what the problem is"
    assert _kind(call=lambda: (_ for _ in ()).throw(NonFiniteError(long)), expect_words=("nan",)) == \
        "failure:vague-message"
    assert _kind(call=lambda: x, must_raise=True) == "failure:accepted"
    assert _kind(call=lambda: (_ for _ in ()).throw(NonFiniteError(long)), must_succeed=True) == \
        "failure:refused"
    assert _kind(call=lambda: np.zeros(2) + np.asarray(np.ones(2) + 1j).astype(float)) == \
        "failure:complex-cast"


def test_hang_is_bounded(monkeypatch):
    monkeypatch.setattr(H, "TIME_LIMIT", 1)
    start = time.perf_counter()

    def spin():
        while True:
            time.sleep(0.05)
    assert _kind(call=spin) == "failure:hang"
    assert time.perf_counter() - start < 5


def test_run_case_asserts_and_counts(monkeypatch):
    monkeypatch.delenv("FUZZ_NO_ASSERT", raising=False)
    before = H.COUNTS["harness-self-test"]["k"]["failure:nan"]
    with pytest.raises(AssertionError, match="failure:nan"):
        H.run_case(H.Case("harness-self-test", "k", call=lambda: np.nan))
    assert H.COUNTS["harness-self-test"]["k"]["failure:nan"] == before + 1
    H.COUNTS.pop("harness-self-test")
    H.FAILURES.pop(("harness-self-test", "k", "failure:nan"), None)


def test_rescaled_checks_extreme_scales_relatively():
    x0 = np.linspace(0.2, 0.9, 3)
    for s in (1e-150, 1e150):
        assert H.grad_check(H.rescaled(lambda x: x ** 2, (s,), s ** 2), x0)
        bad = H.rescaled(lambda x: _wrong_sin(x / s) * s, (s,), s)
        assert not H.grad_check(bad, x0)


def test_user_exception_is_not_a_library_crash():
    def users_residual():
        raise KeyError("the user's own bug")
    assert _kind(call=users_residual) == "user"
