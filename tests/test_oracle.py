"""Oracle vectors: export, the documented file layout, and compare() against the
same, a perturbed and a forward-only implementation."""
import json

import numpy as onp
import pytest

from verification import oracle
from verification.registry import get


@pytest.fixture(scope="module")
def simplex_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("oracle") / "simplex.npz")
    header = oracle.export("simplex-projection", path, cases=2, seed=5, n_directions=2)
    return path, header


def test_file_layout_and_header(simplex_file):
    path, header = simplex_file
    with onp.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        text = str(data["header"])
    assert json.loads(text) == header
    assert header["format"] == "nimplicit-oracle" and header["version"] == 1
    assert header["argnums"] == [0] and len(header["cases"]) == 2
    assert set(header["versions"]) >= {"python", "numpy", "scipy", "autograd", "nimplicit"}
    assert [c["seed"] for c in header["cases"]] == [5, 6]
    case = header["cases"][0]
    assert case["output_is_tuple"] and len(case["outputs"]) == 3 and case["check"]["passed"]
    for name in ("case0/input0", "case0/output0", "case0/output2", "case1/cotangent1/output2",
                 "case1/vjp1/input0", "case0/tangent0/input0", "case0/jvp1/output1"):
        assert name in keys


def test_round_trip_passes(simplex_file):
    path, header = simplex_file
    wrapped = oracle.AutogradWrapper(get("simplex-projection").fn, header["argnums"])
    rep = oracle.compare(path, wrapped)
    assert rep.passed, rep
    assert all(c.vjp_error == 0.0 and c.jvp_error == 0.0 for c in rep.cases)


def test_forward_only_implementation_uses_finite_differences(simplex_file):
    path, header = simplex_file
    wrapped = oracle.AutogradWrapper(get("simplex-projection").fn, header["argnums"])
    rep = oracle.compare(path, lambda *a: wrapped(*a))
    assert rep.passed, rep
    assert all(c.jvp_source == "FD of fn" and c.vjp_error is None for c in rep.cases)


def test_perturbed_implementations_are_detected_per_case(simplex_file):
    path, header = simplex_file
    good = oracle.AutogradWrapper(get("simplex-projection").fn, header["argnums"])

    def vjp_off(inputs, cot):
        return tuple(g * (1 + 1e-4) for g in good.vjp(inputs, cot))

    def jvp_off(inputs, tan):
        return tuple(-t for t in good.jvp(inputs, tan))
    rep = oracle.compare(path, good, vjp=vjp_off, jvp=jvp_off)
    assert not rep.passed and all(not c.passed for c in rep.cases)
    assert all(c.vjp_error == pytest.approx(1e-4, rel=1e-3) for c in rep.cases)
    assert all(c.jvp_error == pytest.approx(2.0) for c in rep.cases)
    shifted = oracle.compare(path, lambda x: tuple(p + 1e-5 for p in good(x)), vjp=good.vjp,
                             jvp=good.jvp)
    assert not shifted.passed and "FAIL" in str(shifted)


def test_float_inputs_round_trip(tmp_path):
    path = str(tmp_path / "circle.npz")
    header = oracle.export("sphere-height", path, cases=1)
    assert header["cases"][0]["inputs"][1]["kind"] == "float"
    h, arrays = oracle.load(path)
    assert isinstance(oracle.case_inputs(h, arrays, 0)[1], float)
    assert oracle.compare(path, oracle.AutogradWrapper(get("sphere-height").fn, h["argnums"])).passed


def test_not_an_oracle_file(tmp_path):
    path = tmp_path / "x.npz"
    onp.savez(path, a=onp.ones(2))
    with pytest.raises(oracle.OracleError):
        oracle.load(str(path))
