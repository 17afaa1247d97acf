"""benchmarks/gpu_check.sh and its Python parts, as far as a machine without a GPU can check:
the script parses and refuses cleanly in one line, its CPU rehearsal runs every part, the goal
arithmetic is right, and the imitation run works without DeepSpeed or webdataset."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from benchmarks.kernel_check import goals
from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_the_check_refuses_in_one_line_with_status_2(tmp_path):
    # PYTHON: the script must reach this interpreter's torch, whatever python3 is on PATH.
    env = {**{k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")},
           "PYTHON": sys.executable}
    for part in ("env", "all"):  # all stops after env
        proc = subprocess.run(["bash", str(SCRIPT), part, str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=300, env=env, check=False)
        assert proc.returncode == 2, (part, proc.stderr)
        assert "== kernel-tests" not in proc.stdout
        (line,) = proc.stderr.strip().splitlines()  # one line: what is missing, how to fix it
        assert line.startswith("env: MISSING a CUDA build of torch") and "TORCH_INDEX_URL=" in line
    for cmd in ([sys.executable, str(REPO / "benchmarks" / "kernel_check.py"), str(tmp_path)],
                [sys.executable, str(REPO / "benchmarks" / "imitation_run.py"), str(tmp_path)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env,
                              check=False)
        assert proc.returncode == 2, (cmd, proc.stderr)
        assert proc.stderr.strip().startswith("no CUDA GPU:"), proc.stderr
        assert "Traceback" not in proc.stderr
    for args, words in (([], "give a part"), (["bench", "x"], "unknown part 'bench'"),
                        (["env"], "give an output folder"), (["env", "x", "--fast"],
                                                             "unknown option --fast")):
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                              timeout=60, env=env, check=False)
        assert proc.returncode == 2 and words in proc.stderr, (args, proc.stderr)


def test_the_cpu_rehearsal_runs_every_part(tmp_path):
    """TRITON_INTERPRET=1 gpu_check.sh all: every part's logic on CPU (a few kernel tests, the
    benchmark's tiny shapes, the tiny config's imitate stage with both backends in bf16), each
    part's time and compile line, the kernel tests' compile census, and the logs and CSVs copied
    flat into $OUT as a lent machine sends them back."""
    out, back = tmp_path / "check", tmp_path / "back"
    back.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "TRITON_INTERPRET": "1", "OUT": str(back),
           "GPU_CHECK_TESTS": "N1 and float32 and linear_matches"}
    proc = subprocess.run(["bash", str(SCRIPT), "all", str(out), "--no-compile"],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CPU rehearsal" in proc.stdout and "env: ok" in proc.stdout
    for part in ("env", "kernel-tests", "kernel-bench", "train"):
        assert re.search(rf"^\[{part}\] \d+ s", proc.stdout, re.MULTILINE), part
        assert re.search(rf"^{part}: ok, \d+ s$", proc.stdout, re.MULTILINE), part
    tests_log = (out / "kernel-tests.log").read_text()
    assert re.search(r"^\d+ passed", tests_log, re.MULTILINE) and "failed" not in tests_log
    census = re.search(r"a GPU would compile (\d+) kernels with pinned tiles, (\d+) with "
                       r"autotuning", (out / "kernel-tests.log").read_text())
    assert census and 0 < int(census[1]) < int(census[2])  # autotuning compiles every tile
    assert (out / "triton_cache").is_dir()
    with (out / "kernel" / "kernel_bench.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    # 2 dtypes × masked or not × (linear: fused, eager, floor; elementwise: fused, eager)
    assert len(rows) == 4 * 3 + 4 * 2
    assert all(float(r["fused_loss_rel_err"]) < 1e-2 for r in rows)
    with (out / "imitation" / "imitation_run.csv").open(newline="") as f:
        runs = list(csv.DictReader(f))
    assert [(r["schedule"], r["backend"], r["precision"]) for r in runs] == [
        (s, b, "bf16") for s in ("sequential", "parallel") for b in ("triton", "reference")]
    stage = json.loads((out / "imitation" / "sequential-triton" / "imitate" / "stage.json")
                       .read_text())
    assert stage["imitation_loss"]["backend"] == "triton"
    assert stage["imitation_loss"]["dtype"] == "bfloat16"
    assert sorted(p.name for p in back.iterdir()) == sorted(
        ["env.log", "kernel-tests.log", "kernel-bench.log", "kernel_bench.csv",
         "kernel_goals.csv", "train.log", "imitation_run.csv"])


def _row(provider, ms, mem, **kw):
    base = {"sweep": "linear", "dtype": "bfloat16", "tf32": False, "mask": False,
            "tokens": 8192, "d_in": 512, "d_out": 2048, "pct_peak_bw": math.nan}
    return {**base, **kw, "provider": provider, "ms": ms, "peak_extra_mb": mem}


def test_goals_compare_the_fused_kernel_the_right_way_round():
    rows = [_row("fused", 1.0, 10.0), _row("eager", 2.0, 100.0), _row("compile", 1.1, 50.0),
            _row("floor", 0.9, 5.0)]
    (rec,) = goals(rows)
    assert (rec["eager_x"], rec["compile_x"]) == (2.0, 1.1)  # other / fused: > 1 is faster
    assert rec["floor_ratio"] == pytest.approx(1.111, abs=1e-3)  # fused / floor
    assert rec["mem_ratio"] == 0.1  # fused extra peak / eager's
    assert rec["eager_x_ok"] is True and rec["compile_x_ok"] is False  # 1.1 < 1.15
    assert rec["floor_ratio_ok"] is True and rec["mem_ratio_ok"] is True
    assert rec["pct_peak_bw_ok"] == ""  # not measured for a linear case
    slow = [_row("fused", 3.0, 90.0), _row("eager", 2.0, 100.0)]
    (rec,) = goals(slow)
    assert rec["eager_x_ok"] is False and rec["mem_ratio_ok"] is False
    assert rec["compile_x_ok"] == "" and rec["floor_ratio_ok"] == ""


def test_the_imitation_run_needs_neither_deepspeed_nor_webdataset(tmp_path):
    """Both modules made unimportable: the run imports a stand-in for webdataset, never
    imports DeepSpeed, and times both schedules (on CPU: the reference backend, fp32)."""
    code = textwrap.dedent(f"""
        import runpy, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("deepspeed", "webdataset"):
                    raise ImportError(f"{{name}} is blocked in this test")
        sys.meta_path.insert(0, Block())
        sys.argv = ["imitation_run.py", {str(tmp_path)!r}, "--allow-cpu", "--steps", "2",
                    "--backends", "reference", "--precision", "fp32",
                    "--config", {str(REPO / "configs" / "tiny_cpu.yaml")!r},
                    "data.batch_size=8", "threads=1"]
        runpy.run_path({str(REPO / "benchmarks" / "imitation_run.py")!r}, run_name="__main__")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "webdataset is not installed" in proc.stdout
    with (tmp_path / "imitation_run.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["schedule"], r["backend"]) for r in rows] == [("sequential", "reference"),
                                                             ("parallel", "reference")]
    assert all(float(r["step_ms"]) > 0 and int(r["steps"]) == 3 * 2 for r in rows)
