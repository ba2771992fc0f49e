"""nimplicit-gradcheck, called in-process: exit codes, the table, --json, a user's
own layer, the self-test and the export / compare subcommands."""
import json
import textwrap

import pytest

from verification.cli import main

FAST = ["--workers", "1", "--no-progress"]


def test_list(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("sphere-height", "deq-tanh", "deq-tanh-gmres", "robust-pool",
                 "simplex-projection", "deq-tanh-batched"):
        assert name in out


def test_check_layers_prints_the_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    code = main(["--layer", "sphere-height", "--layer", "deq-tanh-batched", "--cases", "2",
                 "--json", str(path)] + FAST)
    out = capsys.readouterr().out
    assert code == 0, out
    header = out.splitlines()[0]
    for column in ("layer", "cases", "VJP rel", "JVP rel", "2nd rel", "cond(J)", "time", "result"):
        assert column in header
    rows = [line for line in out.splitlines() if line.startswith(("sphere-height", "deq-tanh-batched"))]
    assert len(rows) == 2 and all(r.rstrip().endswith("PASS") for r in rows)
    data = json.loads(path.read_text())
    assert data["passed"] is True and len(data["cases"]) == 4
    case = data["cases"][0]
    assert case["vjp"] < 1e-6 and case["order2"] is not None and case["cond"] >= 1
    assert case["report"]["results"][0]["passed"] is True


def test_order_and_modes_options(capsys):
    assert main(["--layer", "sphere-height", "--cases", "1", "--order", "1",
                 "--modes", "rev"] + FAST) == 0
    row = [l for l in capsys.readouterr().out.splitlines() if l.startswith("sphere-height")][0]
    vjp, jvp, second = row.split()[2:5]
    assert vjp != "-" and jvp == "-" and second == "-"


def test_bad_arguments_exit_2(capsys):
    assert main(["--layer", "no-such-layer"] + FAST) == 2
    assert main(["--modes", "sideways"] + FAST) == 2
    assert main(["--target", "math:sin"] + FAST) == 2            # --instances missing


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_layers.py").write_text(textwrap.dedent('''
        import autograd.numpy as np
        import numpy as onp
        from autograd.extend import primitive, defvjp
        from nimplicit import implicit_layer

        cube_root = implicit_layer(lambda y, x: y ** 3 + y - x,
                                   lambda x: _newton(onp.asarray(x, float)))

        def _newton(x):
            y = onp.cbrt(x)
            for _ in range(60):
                y = y - (y ** 3 + y - x) / (3 * y ** 2 + 1)
            return y

        def generate(rng):
            return (rng.standard_normal(5),)

        @primitive
        def wrong(x):
            return np.sin(x)
        defvjp(wrong, lambda ans, x: lambda g: g * np.cos(x) * (1 + 1e-4))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_layers"


def test_target_checks_a_users_layer(user_module, capsys):
    assert main(["--target", f"{user_module}:cube_root", "--instances",
                 f"{user_module}:generate", "--cases", "2"] + FAST) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["--target", f"{user_module}:wrong", "--instances", f"{user_module}:generate",
                 "--cases", "1", "--order", "1", "--modes", "rev", "--verbose"] + FAST) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "VJP" in out and "1.0e-04" in out


def test_process_pool(capsys):
    assert main(["--layer", "sphere-height", "--cases", "2", "--workers", "2",
                 "--no-progress"]) == 0


def test_self_test_small(capsys, tmp_path):
    path = tmp_path / "self.json"
    assert main(["--self-test", "--layer", "sphere-height", "--cases", "2", "--json",
                 str(path)] + FAST) == 0
    out = capsys.readouterr().out
    assert "false alarms" in out and "PASS" in out
    row = json.loads(path.read_text())["self_test"][0]
    assert row["caught"] == 20 and row["missed"] == 0 and not row["false_alarms"]


def test_export_and_compare_subcommands(tmp_path, capsys):
    path = tmp_path / "circle.npz"
    assert main(["export", "--layer", "sphere-height", "--out", str(path), "--cases", "2"]) == 0
    assert path.exists()
    # the registered layer wrapped to the protocol passes against its own oracle
    assert main(["compare", str(path), "--target", "verification.entries.core:circle"]) == 0
    assert "PASS" in capsys.readouterr().out
