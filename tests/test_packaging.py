"""An installed (non-editable) copy, in a fresh venv: kernels/ ships as gwtn_dist.kernels,
never as `kernels`, and in the checkout `import kernels` is never this folder; torch is required
as a range that holds the version the set-up installs, not as a pin; every other dependency is
pinned, for the tested Python, in constraints.txt."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

CHECK = """
import importlib.util, pathlib, sys
import gwtn_dist, gwtn_dist.kernels
from gwtn_dist.kernels import imitation_mse, select_imitation_mse
from gwtn_dist.benchmarks import imitation_kernels, step  # what `gwtn bench` runs
from gwtn_dist.config import load_config
from gwtn_dist.models.family import build_thin
for family, data in (("resnet", "fashion-mnist"), ("bert", "text")):  # each family ships
    build_thin(load_config(None, [f"model.family={family}", f"data.dataset={data}"]).model)
site = pathlib.Path(sys.argv[1]).resolve()
for module in (gwtn_dist, gwtn_dist.kernels):  # the wheel's copy, never the checkout's
    assert pathlib.Path(module.__file__).resolve().is_relative_to(site), module.__file__
assert not (site / "kernels").exists(), "a top-level kernels package was installed"
print("ok")
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel built from a copy of the sources (as pip builds it, through
    the backend) installed in it, not editable; returns the venv's folder.

    The venv has no pip and downloads nothing: the checkout's pip installs the wheel into it
    (``--python``, so the ``gwtn`` console script lands in its bin/), and a .pth line makes the
    checkout venv's site-packages (torch, DeepSpeed, ...) visible behind its own. A folder added
    by a .pth line has its own .pth files left unread, so the checkout's editable gwtn_dist finder
    is not installed there: gwtn_dist can only come from the wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, wheels, venv = tmp / "src", tmp / "wheels", tmp / "venv"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("gwtn_dist", "kernels"):  # a copy: the build leaves nothing in the checkout
        shutil.copytree(REPO / folder, src / folder, ignore=skip)
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("gwtn_dist-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   capture_output=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True,
                   timeout=300)
    (_site_packages(venv) / "checkout_deps.pth").write_text(
        sysconfig.get_path("purelib") + "\n")
    return venv


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def _fresh_env() -> dict[str, str]:
    """This process's environment without PYTHONPATH, so nothing leads back to the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_wheel_installs_kernels_under_gwtn_dist(installed, tmp_path):
    site = _site_packages(installed)
    assert site.is_dir(), site
    proc = subprocess.run([str(installed / "bin" / "python"), "-c", CHECK, str(site)],
                          cwd=tmp_path, env=_fresh_env(), capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("config", ["tiny_cpu.yaml", "bert_tiny_cpu.yaml"],
                         ids=["resnet", "bert"])
def test_the_installed_wheel_runs_each_familys_tiny_config(installed, tmp_path, shard_dir,
                                                           config):
    """What a cluster image gets from `pip install gwtn_dist-*.whl`: the fresh venv's `gwtn`
    runs every stage of each family's tiny config, a few steps each (a wheel that lacked a
    family's modules built no net before find_packages)."""
    from tests.test_bert_pipeline import write_shards

    images = config == "tiny_cpu.yaml"
    shards = shard_dir if images else write_shards(tmp_path, test_every=10)
    run_dir = tmp_path / "run"
    args = ["-q", "run", str(REPO / "configs" / config), f"run_dir={run_dir}",
            f"data.shards={shards}", "progress=false", "threads=1", "arms=[win]", "wide.cache=",
            "wide.steps=3", "imitate.steps_per_point=2", "finetune.kd_steps=0",
            "finetune.label_steps=3", "eval_every=0",
            *(["data.train_samples=0"] if images else [])]  # the tests' shards are small
    proc = subprocess.run([str(installed / "bin" / "gwtn"), *args], cwd=tmp_path,
                          env=_fresh_env(), capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("wide", "imitate", "finetune"):
        assert (run_dir / stage / "DONE").is_file(), stage


def _import_kernels_in_the_checkout(pythonpath: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    # `python -c` puts the working directory, the checkout, first on sys.path; -S leaves out
    # site-packages, so a `kernels` installed there (Hugging Face's) cannot decide the outcome.
    code = "import kernels; print(kernels.WHO)"
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_in_the_checkout_import_kernels_reaches_another_projects_kernels(tmp_path):
    # transformers >= 5.25 imports Hugging Face's `kernels`, and its setuptools plugin loads in
    # every build; from the checkout's root our kernels/ folder must not stand in for it.
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("from kernels.part import WHO\n")
    (other / "part.py").write_text("WHO = 'the other kernels'\n")
    proc = _import_kernels_in_the_checkout(str(tmp_path / "site"))
    assert proc.returncode == 0 and proc.stdout.strip() == "the other kernels", proc.stderr


def test_in_the_checkout_import_kernels_alone_is_not_found():
    proc = _import_kernels_in_the_checkout(None)
    assert proc.returncode == 1 and "is gwtn_dist.kernels" in proc.stderr, proc.stderr


def _setup_argument(name: str):
    """The literal value of setup.py's ``setup(name=...)`` argument."""
    tree = ast.parse((REPO / "setup.py").read_text())
    (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
               and getattr(n.func, "id", None) == "setup"]
    (kw,) = [k for k in call.keywords if k.arg == name]
    return ast.literal_eval(kw.value)


def _install_requires() -> list[str]:
    return _setup_argument("install_requires")


def test_torch_is_a_range_that_holds_the_pinned_set_up():
    (torch_req,) = [Requirement(r) for r in _install_requires() if r.startswith("torch")]
    operators = {spec.operator for spec in torch_req.specifier}
    assert "==" not in operators and "===" not in operators, torch_req
    assert {">=", "<"} <= operators, f"{torch_req}: give a floor and a ceiling"
    # The set-up installs this build unless a torch in range is there; the range must accept it.
    (pinned,) = re.findall(r"TORCH_SPEC:-torch==([0-9.]+)\}", (REPO / "setup.sh").read_text())
    assert torch_req.specifier.contains(Version(pinned)), (torch_req, pinned)
    assert "MIT License" in (REPO / "LICENSE").read_text()


def _bash_blocks(markdown: str, heading: str) -> list[list[str]]:
    """The non-empty lines of each ```bash block under ``## heading``."""
    section = markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = [part.split("```", 1)[0] for part in section.split("```bash\n")[1:]]
    return [[line for line in block.splitlines() if line.strip()] for block in blocks]


def test_ci_runs_exactly_the_readme_commands():
    # What CI proves is what a reader types: set-up, test, then the Run section's quick run of
    # the main job (the full run does not fit CI's time), in that order, word for word.
    readme = (REPO / "README.md").read_text()
    (setup,), (test,) = _bash_blocks(readme, "Set up"), _bash_blocks(readme, "Test")
    main_run, quick_run = _bash_blocks(readme, "Run")
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == [*setup, *test, *quick_run]
    assert setup[0] == "./setup.sh" and os.access(REPO / "setup.sh", os.X_OK)
    # The quick run is the main command with overrides only: same program, same config.
    (main_line,), (quick_line,) = main_run, quick_run
    assert quick_line.startswith(main_line + " ")
    assert all("=" in word for word in quick_line[len(main_line):].split())


def _constraints() -> dict[str, Requirement]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(r.name): r for r in reqs}


def test_constraints_pin_every_dependency_but_torch_on_the_tested_python():
    # A fresh set-up must get the versions the suite passed with (a new transformers once
    # broke CI), yet leave a cluster's torch, and another Python's choice of releases, alone.
    pins = _constraints()
    direct = [*_install_requires(), *_setup_argument("extras_require")["test"]]
    wanted = {canonicalize_name(Requirement(r).name) for r in direct}
    assert wanted - {"torch", "triton"} <= set(pins), wanted - set(pins)
    assert not {"torch", "triton", "sympy", "networkx", "jinja2"} & set(pins)
    for req in pins.values():
        (spec,) = req.specifier
        assert spec.operator == "==", req
        assert str(req.marker) == 'python_version == "3.11"', req
    assert re.search(r'-c "\$CONSTRAINTS"', (REPO / "setup.sh").read_text())


@pytest.mark.skipif(os.environ.get("CI") != "true" or sys.version_info[:2] != (3, 11),
                    reason="checks a fresh ./setup.sh environment on the tested Python (CI=true)")
def test_a_fresh_set_up_installed_the_pinned_versions():
    installed = {name: _installed_version(name) for name in _constraints()}
    wrong = {name: (str(req.specifier), installed[name])
             for name, req in _constraints().items()
             if installed[name] and not req.specifier.contains(installed[name])}
    assert not wrong, f"installed versions differ from constraints.txt: {wrong}"


def _installed_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None  # pinned for a package another extra or platform brings: nothing to check
