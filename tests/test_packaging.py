"""Packaging: the wheel a user gets, built from a clean checkout, installed into a fresh virtualenv.

README "Install": `pip wheel --no-build-isolation --no-deps .` (here CPU-only, STEPFLOW_CUDA=0, to keep
it short), then install the wheel elsewhere. The checkout is `git archive HEAD` of this repository (what
a fresh clone holds: committed files only); the virtualenv is new and has the project's torch (and the
other dependencies) through a .pth line to the running interpreter's site-packages, whose own .pth
files (the editable install of this checkout among them) are not processed there; installing torch
2.14.1 into a new virtualenv instead takes ~7 minutes and 5.4 GB. Everything runs from a folder outside
the source tree. Cost: one CPU-only compile of _C (~2-4 minutes on 2 cores), seconds for the rest;
`make test` runs this module last (marker `packaging`).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.packaging, pytest.mark.slow]


def _run(cmd, *, cwd, env=None, timeout=600):
    """subprocess.run in its own process group, all of which (ninja, the compilers) ends on a timeout."""
    start = time.time()
    with subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as child:
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            raise
    proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
    took = time.time() - start
    print(f"[{took:6.1f} s] rc={proc.returncode} {' '.join(str(c) for c in cmd)[:160]}")
    return proc, took


def _clean_env(**extra):
    """The environment of a user's shell: no PYTHONPATH, no virtualenv of ours activated."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONNOUSERSITE")}
    env.update(extra)
    return env


def _git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel path, virtualenv python, work folder, timings): the wheel of HEAD installed into a new venv."""
    if _git("rev-parse", "--is-inside-work-tree").returncode != 0:
        pytest.skip("not a git checkout: the packaging test builds from `git archive HEAD`")
    work = tmp_path_factory.mktemp("packaging")
    timings = {}

    # 1. A clean checkout: the committed tree of HEAD, nothing built, nothing untracked.
    src = work / "src"
    src.mkdir()
    archive = _git("archive", "--format=tar", "HEAD")
    assert archive.returncode == 0, archive.stderr.decode()
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(src, filter="data")
        else:  # Python < 3.10.12 / 3.11.4
            tar.extractall(src)
    assert not list(src.glob("stepflow_ext/_C*")), "the clean checkout holds a compiled _C"

    # 2. The wheel, CPU-only, against the running interpreter's torch.
    wheels = work / "wheels"
    env = _clean_env(STEPFLOW_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    proc, timings["wheel"] = _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                                   "-w", wheels, src], cwd=work, env=env, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    found = sorted(wheels.glob("stepflow_ext-*.whl"))
    assert len(found) == 1, found

    # 3. A fresh virtualenv that sees the project's torch and dependencies.
    venv = work / "venv"
    proc, timings["venv"] = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=work)
    assert proc.returncode == 0, proc.stderr
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    project_sites = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_stepflow_project_deps.pth").write_text("".join(f"{p}\n" for p in project_sites))

    # 4. pip (the project's, run for the new interpreter) installs the wheel; --ignore-installed: the
    # project's editable stepflow-ext, visible through the .pth line, is not this environment's to remove.
    proc, timings["install"] = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
                                     "--no-index", "--ignore-installed", found[0]], cwd=work, env=_clean_env())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    shutil.rmtree(src / "build", ignore_errors=True)
    yield found[0], python, work, site, timings
    print("packaging timings (s):", {k: round(v, 1) for k, v in timings.items()})


def test_wheel_contents(built):
    """The wheel holds the compiled module, every module of the package and the embedded model and task files."""
    wheel = built[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = _git("ls-files", "stepflow_ext").stdout.decode().split()
    assert tracked
    missing = [p for p in tracked if p not in names]
    assert not missing, f"files of the package missing from {wheel.name}: {missing}"
    assert any(n.startswith("stepflow_ext/_C") and n.endswith(".so") for n in names), sorted(names)
    for data in ("stepflow_ext/data/tiny_reasoner/model.safetensors", "stepflow_ext/data/tiny_reasoner/tokenizer.json",
                 "stepflow_ext/data/tiny_tasks/test.jsonl", "stepflow_ext/data/tiny_tasks/dev.jsonl"):
        assert data in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "stepflow = stepflow_ext.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


SOLVE = textwrap.dedent("""
    import json, os, sys, torch
    import stepflow_ext as sf
    from stepflow_ext.tiny.model import PACKAGED_DIR, generate_completions
    from stepflow_ext.tiny.tasks import boxed_answer

    model, tok = sf.load_default()
    tasks = os.path.join(os.path.dirname(sf.__file__), "data", "tiny_tasks", "test.jsonl")
    items = [json.loads(line) for line in open(tasks)][:4]
    completions = generate_completions(model, tok, [item["problem"] for item in items])
    print(json.dumps({
        "package": sf.__file__, "C": sf._C.__file__, "model_dir": PACKAGED_DIR, "cwd": os.getcwd(),
        "cuda_compiled": sf.cuda_compiled, "built_torch": sf._C.torch_version, "torch": torch.__version__,
        "torch_file": torch.__file__, "params": sum(p.numel() for p in model.parameters()),
        "answers": [boxed_answer(c) for c in completions], "expected": [item["answer"] for item in items],
    }))
""")


def test_installed_wheel_imports_and_solves_outside_the_tree(built):
    """import, load_default() and a few packaged test items, from the installed wheel, outside the source tree."""
    _, python, work, site, _ = built
    outside = work / "elsewhere"
    outside.mkdir(exist_ok=True)
    proc, _ = _run([python, "-c", SOLVE], cwd=outside, env=_clean_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("package", "C", "model_dir"):
        assert Path(info[key]).resolve().is_relative_to(site.resolve()), (key, info[key], site)
    assert not Path(info["package"]).resolve().is_relative_to(ROOT)
    assert info["cuda_compiled"] is False
    assert info["built_torch"] == info["torch"]
    assert info["params"] > 1_000_000
    # The embedded reasoner solves in-distribution chains (94% of them); 3 of 4 leaves room for one miss.
    hits = sum(str(a) == str(e) for a, e in zip(info["answers"], info["expected"]))
    assert hits >= 3, info


def test_installed_cli_help(built):
    """The `stepflow` entry point of the installed wheel (the venv's script, its own interpreter)."""
    _, python, work, _, _ = built
    script = python.parent / "stepflow"
    assert script.read_text().splitlines()[0] == f"#!{python}"
    proc, _ = _run([script, "--help"], cwd=work, env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    assert "usage: stepflow" in proc.stdout and "demo" in proc.stdout


MISMATCH_LOADED = "import torch; torch.__version__ = '0.0.1'; import stepflow_ext"
# _C fails to load as it does under another libtorch (undefined symbols): the package then reads the
# torch version recorded in the binary.
MISMATCH_UNLOADABLE = textwrap.dedent("""
    import importlib.abc, importlib.machinery, sys, torch

    class Unloadable(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "stepflow_ext._C":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            class Loader(importlib.abc.Loader):
                def create_module(self, spec):
                    raise ImportError(spec.origin + ": undefined symbol: _ZN3c106detail14torchCheckFailEPKc")
                def exec_module(self, module):
                    pass
            spec.loader = Loader()
            return spec

    sys.meta_path.insert(0, Unloadable())
    torch.__version__ = "0.0.1"
    import stepflow_ext
""")


@pytest.mark.parametrize("script", [MISMATCH_LOADED, MISMATCH_UNLOADABLE], ids=["loaded", "unloadable"])
def test_import_under_another_torch_says_so(built, script):
    """Built for one torch, imported under another: one clear ImportError naming both versions and the fix."""
    _, python, work, _, _ = built
    proc, _ = _run([python, "-c", script], cwd=work, env=_clean_env())
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: stepflow_ext: its compiled extension"), proc.stderr[-3000:]
    assert "but this Python runs torch 0.0.1" in last and "pip install --no-build-isolation ." in last
    built_for = subprocess.check_output([python, "-c", "import torch; print(torch.__version__)"], text=True,
                                        cwd=work, env=_clean_env()).strip()
    assert f"built against torch {built_for}," in last
