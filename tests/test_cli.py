"""nimplicit-gradcheck, called in-process: exit codes, the table, --json, a user's
own layer, the self-test and the export / compare subcommands."""
import inspect
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as onp
import pytest

from verification import cli, oracle
from verification.cli import Progress, as_instance, main

ROOT = Path(__file__).resolve().parent.parent

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
    assert main(["export", "sphere-height", str(path), "--cases", "2", "--directions", "1"]) == 0
    assert path.exists()
    # the registered layer wrapped to the protocol passes against its own oracle
    assert main(["compare", str(path), "--target", "verification.entries.core:circle"]) == 0
    assert "PASS" in capsys.readouterr().out


# ------------------------------------------------------------------------------
# Unix-tool behaviour (issue 15 item 3)
# ------------------------------------------------------------------------------

USER_MODULE = '''
import autograd.numpy as anp
import numpy as np
from nimplicit import implicit_layer

cube_root = implicit_layer(lambda y, x: y ** 3 + y - x, lambda x: _newton(np.asarray(x, float)))

def _newton(x):
    y = np.cbrt(x)
    for _ in range(60):
        y = y - (y ** 3 + y - x) / (3 * y ** 2 + 1)
    return y

def one_array(rng):                 # a bare array: ONE input of shape (4,)
    return rng.standard_normal(4)

def norm_layer(x):                  # needs all of x: splitting it into rows breaks it
    assert np.shape(x) == (4,), np.shape(x)
    return cube_root(anp.sum(x ** 2))

def broken(x):
    raise RuntimeError("the layer itself is broken")

def doubled_circle(*inputs):        # a wrong implementation of sphere-height
    from verification.entries.core import circle
    return 2 * np.asarray(circle(*inputs))

def plain_circle(x, r):             # sphere-height in plain autograd, no implicit layer
    return anp.sqrt(r ** 2 - anp.sum(x ** 2))

class VJPOnly:                      # the wrapper protocol without .jvp
    def __init__(self, fn):
        from verification.oracle import AutogradWrapper
        self._w = AutogradWrapper(fn, (0, 1))
    def __call__(self, *inputs):
        return self._w(*inputs)
    def vjp(self, inputs, cotangent):
        return self._w.vjp(inputs, cotangent)

vjp_only_circle = VJPOnly(plain_circle)

def _wrapped():
    from verification.oracle import AutogradWrapper
    return AutogradWrapper(plain_circle, (0, 1))

wrapped_circle = _wrapped()

def torch_circle(x, r):             # sphere-height in PyTorch (for --framework torch)
    import torch
    return torch.sqrt(r ** 2 - torch.sum(x ** 2))

from autograd.extend import defjvp, defvjp, primitive

@primitive
def _bad_square(x):
    return x ** 2

defvjp(_bad_square, lambda ans, x: lambda g: 3 * g * x)     # wrong: should be 2 g x
defjvp(_bad_square, lambda g, ans, x: 3 * g * x)

def wrong_gradient(x):              # its autograd gradient disagrees with finite differences
    return anp.sum(_bad_square(x))
'''


@pytest.fixture
def cwd_module(tmp_path, monkeypatch):
    """A user module in the working directory, NOT on sys.path (as after `cd mydir`)."""
    name = f"cwd_layers_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield name
    sys.modules.pop(name, None)


def test_target_resolves_modules_from_the_working_directory(cwd_module, capsys):
    code = main(["--target", f"{cwd_module}:norm_layer", "--instances", f"{cwd_module}:one_array",
                 "--cases", "2", "--order", "1"] + FAST)
    out = capsys.readouterr()
    assert "ModuleNotFoundError" not in out.err
    assert code == 0, out.out + out.err


def test_generator_returning_a_bare_array_is_one_instance():
    x = onp.arange(6.0).reshape(3, 2)
    assert len(as_instance(x)) == 1 and as_instance(x)[0] is x
    assert as_instance((x, 1.0)) == (x, 1.0)
    assert as_instance([x, x])[1] is x
    assert as_instance(2.5) == (2.5,)
    assert as_instance(v for v in [(x,)]) == (x,)


def test_exit_status_2_on_a_runtime_error_1_on_a_failed_gradient(cwd_module, capsys):
    code = main(["--target", f"{cwd_module}:broken", "--instances", f"{cwd_module}:one_array",
                 "--cases", "1"] + FAST)
    out = capsys.readouterr().out
    assert code == 2 and "the layer itself is broken" in out and "ERROR" in out


def test_cases_zero_and_bad_numbers_are_usage_errors(capsys):
    for argv in (["--cases", "0"], ["--cases", "-3"], ["--workers", "0"], ["--noise", "-1"],
                 ["--rtol", "nan"]):
        assert main(argv + FAST) == 2, argv
        err = capsys.readouterr().err
        assert "usage:" in err and "error:" in err, argv
    assert main(["export", "sphere-height", "x.npz", "--cases", "0"]) == 2


def test_bad_json_path_fails_before_any_case_runs(tmp_path, capsys):
    for path in (tmp_path / "no" / "such" / "dir" / "out.json", tmp_path):
        code = main(["--layer", "sphere-height", "--cases", "1", "--json", str(path)] + FAST)
        out, err = capsys.readouterr()
        assert code == 2 and out == "", out          # nothing ran: no table
        assert "--json" in err


def test_json_output_is_versioned(tmp_path):
    path = tmp_path / "out.json"
    assert main(["--layer", "sphere-height", "--cases", "1", "--order", "1", "--json",
                 str(path)] + FAST) == 0
    data = json.loads(path.read_text())
    assert data["schema_version"] == cli.SCHEMA_VERSION and data["kind"] == "check"
    assert set(data) >= {"schema_version", "kind", "passed", "layers", "cases"}
    assert set(data["cases"][0]) >= {"layer", "seed", "passed", "vjp", "jvp", "order2", "cond",
                                     "error", "report", "seconds"}


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


def test_progress_uses_carriage_returns_only_on_a_terminal():
    layers = ["a", "a", "b"]
    log, tty = _Stream(False), _Stream(True)
    for stream in (log, tty):
        p = Progress(layers, "gradcheck", True, stream)
        for name in layers:
            p.update(name)
        p.close()
    assert "\r" not in log.getvalue()
    assert log.getvalue().splitlines() == ["gradcheck: a done, 2 case(s) [2/3]",
                                           "gradcheck: b done, 1 case(s) [3/3]"]
    assert "\r" in tty.getvalue()


def test_progress_in_a_log_has_one_line_per_layer(capsys):
    assert main(["--layer", "sphere-height", "--layer", "robust-pool", "--cases", "2", "--order", "1",
                 "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == ["gradcheck: sphere-height done, 2 case(s) [2/4]",
                                "gradcheck: robust-pool done, 2 case(s) [4/4]"]


def test_quiet_on_a_closed_pipe():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "verification.cli", "--list"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                       # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == cli.EXIT_PIPE


def test_help_lists_subcommands_and_every_option_has_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nimplicit-gradcheck")
    usage = out.split("\n\n")[0]
    assert "export" in usage and "compare" in usage
    for name, parser in cli.parsers().items():
        for action in parser._actions:
            assert action.help, (name, action.option_strings or action.dest)


def test_noise_is_passed_to_check_grad(monkeypatch):
    from verification import check
    seen = []
    real = check.check_grad

    def spy(*args, **kw):
        seen.append(kw["noise"])
        return real(*args, **kw)
    monkeypatch.setattr(check, "check_grad", spy)
    assert main(["--layer", "sphere-height", "--cases", "1", "--order", "1", "--noise",
                 "1e-9"] + FAST) == 0
    assert seen == [1e-9]


def test_export_positional_form_options_and_deprecated_flags(tmp_path, capsys):
    path = tmp_path / "a.npz"
    assert main(["export", "sphere-height", str(path), "--cases", "1", "--directions", "1",
                 "--seed", "4"]) == 0
    header, _ = oracle.load(str(path))
    assert [c["seed"] for c in header["cases"]] == [4]
    with pytest.warns(DeprecationWarning, match="export LAYER PATH"):
        assert main(["export", "--layer", "sphere-height", "--out", str(path), "--cases", "1"]) == 0
    assert main(["export", "no-such-layer", str(path)]) == 2
    assert main(["export", "sphere-height", str(tmp_path / "missing" / "x.npz")]) == 2
    assert main(["export", "sphere-height", str(path), "--size", "no_such_key=3"]) == 2
    assert "allowed" in capsys.readouterr().err


@pytest.mark.skipif("size" not in inspect.signature(oracle.export).parameters,
                    reason="verification.oracle.export(size=) is not there yet (helper oracle)")
def test_export_size_is_passed_to_the_generator(tmp_path):
    path = tmp_path / "deq.npz"
    assert main(["export", "deq-tanh", str(path), "--cases", "1", "--size", "n=3"]) == 0
    header, arrays = oracle.load(str(path))
    assert header["size"]["n"] == 3


def test_export_size_without_oracle_support_is_a_clear_error(tmp_path, capsys):
    if "size" in inspect.signature(oracle.export).parameters:
        pytest.skip("verification.oracle.export has size=: covered by the test above")
    assert main(["export", "deq-tanh", str(tmp_path / "x.npz"), "--size", "n=3"]) == 2
    assert "size=" in capsys.readouterr().err


def test_export_target(cwd_module, tmp_path, capsys):
    argv = ["export", "--target", f"{cwd_module}:norm_layer", "--instances", f"{cwd_module}:one_array",
            str(tmp_path / "mine.npz"), "--cases", "1"]
    if not hasattr(oracle, "export_function"):
        assert main(argv) == 2
        assert "export_function" in capsys.readouterr().err
        pytest.skip("verification.oracle.export_function is not there yet (helper oracle)")
    assert main(argv) == 0
    assert (tmp_path / "mine.npz").exists()


# ------------------------------------------------------------------------------
# Dask (issue 15 item 6)
# ------------------------------------------------------------------------------

def test_scheduler_without_dask_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)      # import distributed -> ImportError
    assert main(["--layer", "sphere-height", "--cases", "1", "--scheduler",
                 "tcp://127.0.0.1:1"] + FAST) == 2
    assert "pip install" in capsys.readouterr().err


@pytest.fixture(scope="module")
def local_cluster():
    distributed = pytest.importorskip("distributed", reason="the distributed extra is not installed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, host="127.0.0.1")
    yield cluster.scheduler_address
    cluster.close()


def _strip_times(data):
    for case in data.get("cases", []):
        case.pop("seconds", None)
        if case.get("report"):
            case["report"].pop("seconds", None)
    for row in data.get("layers", []) + data.get("self_test", []):
        row.pop("seconds", None)
    return data


def test_check_and_self_test_on_a_local_cluster_match_the_local_run(local_cluster, tmp_path, capsys):
    for extra in ([], ["--self-test"]):
        here, there = tmp_path / "here.json", tmp_path / "there.json"
        base = ["--layer", "sphere-height", "--layer", "robust-pool", "--cases", "2",
                "--order", "1", "--no-progress"] + extra
        assert main(base + ["--workers", "1", "--json", str(here)]) == 0
        assert main(base + ["--scheduler", local_cluster, "--json", str(there)]) == 0
        assert _strip_times(json.loads(here.read_text())) == _strip_times(json.loads(there.read_text()))


def test_export_on_a_local_cluster_matches_the_local_file(local_cluster, tmp_path):
    here, there = tmp_path / "here.npz", tmp_path / "there.npz"
    assert main(["export", "sphere-height", str(here), "--cases", "2", "--directions", "1"]) == 0
    assert main(["export", "sphere-height", str(there), "--cases", "2", "--directions", "1",
                 "--scheduler", local_cluster]) == 0
    (h1, a1), (h2, a2) = oracle.load(str(here)), oracle.load(str(there))
    h1.pop("created"), h2.pop("created")
    assert h1 == h2 and sorted(a1) == sorted(a2)
    for key in a1:
        onp.testing.assert_array_equal(a1[key], a2[key])


def test_compare_exit_status(cwd_module, tmp_path, capsys):
    path = tmp_path / "circle.npz"
    assert main(["export", "sphere-height", str(path), "--cases", "1", "--directions", "1"]) == 0
    assert main(["compare", str(path), "--target", f"{cwd_module}:doubled_circle"]) == 1
    assert main(["compare", str(tmp_path / "missing.npz"), "--target", f"{cwd_module}:doubled_circle"]) == 2
    assert main(["compare", str(path), "--target", "no_such_module_xyz:fn"]) == 2
    assert "cannot import" in capsys.readouterr().err


# ------------------------------------------------------------------------------
# export / compare options of helper oracle's API (glue)
# ------------------------------------------------------------------------------

@pytest.fixture
def circle_file(tmp_path):
    path = tmp_path / "circle.npz"
    assert main(["export", "sphere-height", str(path), "--cases", "2", "--directions", "1"]) == 0
    return path


def test_export_failed_gradient_is_exit_1_and_writes_nothing(cwd_module, tmp_path, capsys):
    out = tmp_path / "bad.npz"
    assert main(["export", "--target", f"{cwd_module}:wrong_gradient", "--instances",
                 f"{cwd_module}:one_array", str(out), "--cases", "1"]) == 1
    err = capsys.readouterr().err
    assert "a gradient failed its check" in err and not out.exists()


def test_export_unknown_variant_is_exit_2(tmp_path, capsys):
    assert main(["export", "sphere-height", str(tmp_path / "v.npz"), "--variant", "no_such"]) == 2
    err = capsys.readouterr().err
    assert "no_such" in err and "variant" in err and "Traceback" not in err


def test_compare_json_and_the_files_recommended_rtol(circle_file, cwd_module, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["compare", str(circle_file), "--target", f"{cwd_module}:wrapped_circle",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    header, _ = oracle.load(str(circle_file))
    assert data["schema_version"] == cli.SCHEMA_VERSION and data["kind"] == "compare"
    assert data["passed"] is True and len(data["cases"]) == 2
    assert data["rtol"] == header["tolerances"]["recommended_rtol"]
    assert all(m["passed"] for c in data["cases"] for m in c["measures"])
    # an explicit --rtol overrides the file's
    assert main(["compare", str(circle_file), "--target", f"{cwd_module}:wrapped_circle",
                 "--rtol", "0.5", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["rtol"] == 0.5
    # a wrong implementation is reported in the JSON too
    assert main(["compare", str(circle_file), "--target", f"{cwd_module}:doubled_circle",
                 "--json", str(out)]) == 1
    assert json.loads(out.read_text())["passed"] is False
    assert main(["compare", str(circle_file), "--target", f"{cwd_module}:wrapped_circle",
                 "--json", str(tmp_path / "missing" / "r.json")]) == 2


def test_compare_jvp_from_and_noise(circle_file, cwd_module, tmp_path, capsys):
    out = tmp_path / "report.json"
    for option, source in (("adjoint", "adjoint identity"), ("fd", "FD of fn")):
        extra = ["--noise", "1e-12"] if option == "fd" else []
        assert main(["compare", str(circle_file), "--target", f"{cwd_module}:vjp_only_circle",
                     "--jvp-from", option, "--json", str(out)] + extra) == 0
        cases = json.loads(out.read_text())["cases"]
        assert all(c["jvp_source"] == source for c in cases), cases
        assert any(m["quantity"].startswith("JVP") for c in cases for m in c["measures"])
    # a target without a VJP: the adjoint identity cannot run (a runtime error, exit 2)
    assert main(["compare", str(circle_file), "--target", f"{cwd_module}:plain_circle",
                 "--jvp-from", "adjoint"]) == 2
    assert "needs the peer's vjp" in capsys.readouterr().err
    assert main(["compare", str(circle_file), "--target", f"{cwd_module}:doubled_circle",
                 "--jvp-from", "nonsense"]) == 2
    assert main(["compare", str(circle_file), "--target", f"{cwd_module}:plain_circle",
                 "--noise", "1e-8"]) == 2
    assert "--jvp-from fd" in capsys.readouterr().err


def test_compare_verifies_the_file_unless_no_verify(circle_file, cwd_module, monkeypatch, capsys):
    def failing_check(path, fn=None):
        raise oracle.OracleVerificationError("planted: stored VJP disagrees")
    monkeypatch.setattr(oracle, "verify_file", failing_check)
    argv = ["compare", str(circle_file), "--target", f"{cwd_module}:wrapped_circle"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "planted" in err and "--no-verify" in err
    assert main(argv + ["--no-verify"]) == 0
    assert "not re-checked" in capsys.readouterr().out


def test_compare_framework_without_the_framework_is_exit_2(circle_file, cwd_module, capsys):
    for framework in ("torch", "jax"):
        try:
            __import__(framework)
            continue                    # installed here: covered by the test below
        except ImportError:
            pass
        assert main(["compare", str(circle_file), "--target", f"{cwd_module}:torch_circle",
                     "--framework", framework]) == 2
        assert "not installed" in capsys.readouterr().err
    assert main(["compare", str(circle_file), "--target", f"{cwd_module}:torch_circle",
                 "--framework", "tensorflow"]) == 2


BENCH_PYTHON = Path("/work/venv-bench/bin/python")


def _python_with_torch():
    try:
        import torch  # noqa: F401
        return sys.executable
    except ImportError:
        pass
    if BENCH_PYTHON.exists() and subprocess.run([str(BENCH_PYTHON), "-c", "import torch, autograd"],
                                                capture_output=True).returncode == 0:
        return str(BENCH_PYTHON)
    return None


def test_compare_framework_torch(circle_file, tmp_path):
    python = _python_with_torch()
    if python is None:
        pytest.skip("no Python with torch and autograd here")
    (tmp_path / "torch_layers.py").write_text(USER_MODULE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "torch.json"
    base = [python, "-m", "verification.cli", "compare", str(circle_file), "--framework", "torch",
            "--json", str(out)]
    good = subprocess.run(base + ["--target", "torch_layers:torch_circle"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stdout + good.stderr
    data = json.loads(out.read_text())
    assert data["passed"] and any(m["quantity"].startswith("VJP")
                                  for c in data["cases"] for m in c["measures"])
    bad = subprocess.run(base + ["--target", "torch_layers:plain_circle_times_two"], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2          # no such function


# ------------------------------------------------------------------------------
# local pool scheduling: a family's kernels are compiled by one worker
# ------------------------------------------------------------------------------

def _timed_job(job):
    """Picklable worker for the scheduling test: a first job of a layer is slow (compiles)."""
    import time as _time
    start = _time.time()
    _time.sleep(0.3 if job["seed"] == 0 else 0.05)
    return {"layer": job["layer"], "seed": job["seed"], "start": start, "end": _time.time()}


def test_job_order_puts_each_layers_first_job_first_families_in_turn():
    jobs = [{"layer": name, "seed": s} for name in ("qp", "qp-eq", "ls-edge", "deq")
            for s in range(2)]
    order = [(jobs[i]["layer"], jobs[i]["seed"]) for i in cli._job_order(jobs)]
    assert order == [("qp", 0), ("ls-edge", 0), ("deq", 0), ("qp-eq", 0),
                     ("qp", 1), ("qp-eq", 1), ("ls-edge", 1), ("deq", 1)]
    assert sorted(cli._job_order(jobs)) == list(range(len(jobs)))
    assert cli._family("level-set-edge") == "level" and cli._family("qp") == "qp"


def test_run_pool_never_runs_two_cold_jobs_of_a_family_at_once():
    jobs = [{"layer": name, "seed": s} for name in ("qp", "qp-eq", "qp-batched", "deq")
            for s in range(2)]
    seen = []
    res = cli._run_pool(_timed_job, jobs, 2, seen.append)
    assert [(r["layer"], r["seed"]) for r in res] == [(j["layer"], j["seed"]) for j in jobs]
    assert len(seen) == len(jobs)
    first = {}
    for r in res:                          # each layer's first finished job made it warm
        first.setdefault(r["layer"], r)
        if r["end"] < first[r["layer"]]["end"]:
            first[r["layer"]] = r
    for a in res:
        for b in res:
            if a is b or cli._family(a["layer"]) != cli._family(b["layer"]):
                continue
            cold_a = a["start"] < first[a["layer"]]["end"]   # started before its layer was warm
            cold_b = b["start"] < first[b["layer"]]["end"]
            if cold_a and cold_b:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)


def _timed_warmup(job):
    """Picklable warm-up worker for the scheduling test."""
    import time as _time
    start = _time.time()
    _time.sleep(0.3)
    return dict(job, start=start, end=_time.time())


def test_run_pool_runs_warmups_first_and_holds_their_family():
    jobs = [{"layer": name, "seed": s} for name in ("qp", "qp-eq", "deq") for s in range(2)]
    warmups = [{"family": "qp", "group": g} for g in ("solve", "polish")]
    t0 = time.time()
    res = cli._run_pool(_timed_job, jobs, 2, lambda r: None, warmups, _timed_warmup)
    assert [(r["layer"], r["seed"]) for r in res] == [(j["layer"], j["seed"]) for j in jobs]
    # the two warm-ups (0.3 s each) took both workers first: every job started after them
    assert min(r["start"] for r in res) - t0 >= 0.3


def test_warmup_jobs_one_per_kernel_group_of_the_families_used():
    from reference_layers.kernels.qp_pdipm import KERNEL_GROUPS
    got = cli.warmup_jobs([{"layer": "qp-eq"}, {"layer": "deq-tanh"}])
    assert [w["group"] for w in got] == list(KERNEL_GROUPS)
    assert {w["family"] for w in got} == {"qp"}
    assert cli.warmup_jobs([{"layer": "deq-tanh"}]) == []
    bad = cli.run_warmup({"family": "qp", "module": "reference_layers.kernels.qp_pdipm",
                          "function": "compile_kernels", "group": "no-such-group"})
    assert bad["error"] and "no-such-group" in bad["error"]
