"""The installs the README gives (``pip install .`` and each extra), as a user gets them.

A core-only install must import the package and step `Ranger`, and every entry point that
needs more must say, in one line, which extra brings it. These tests run each entry point in
a subprocess that sees only what an install would bring: `simulated_install_env` puts a
``sitecustomize`` first on ``PYTHONPATH`` that hides every installed distribution outside
``pip install '.[EXTRA]'``'s dependency closure (read from the installed metadata), both its
modules and its metadata, so ``import fastai`` fails exactly as on a machine without it.

CI also runs this file against a real core-only virtual environment (``pip install .`` in a
fresh venv, see ``.ci/run``): ``RANGER_PLUGINS_CORE_PYTHON`` names its interpreter, and the
core tests then run it with nothing hidden.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# Every test here starts Python in a subprocess (about 5 s each): not in the fast tier.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
REAL_CORE_PYTHON = os.environ.get("RANGER_PLUGINS_CORE_PYTHON")

_SITECUSTOMIZE = '''\
"""Hide the modules and metadata of the distributions a simulated install lacks."""
import importlib.machinery
import os
import sys

_MODULES = frozenset(os.environ["RANGER_TEST_HIDDEN_MODULES"].split(","))
_DISTRIBUTIONS = frozenset(os.environ["RANGER_TEST_HIDDEN_DISTRIBUTIONS"].split(","))


def _canonical(name):
    return name.lower().replace("_", "-").replace(".", "-")


class _Hiding(importlib.machinery.PathFinder):
    """The path finder, blind to the hidden top-level modules and distributions."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in _MODULES:
            return None  # as if not installed: ModuleNotFoundError, find_spec() is None
        return super().find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        for dist in super().find_distributions(*args, **kwargs):
            if _canonical(dist.metadata["Name"] or "") not in _DISTRIBUTIONS:
                yield dist


sys.meta_path[:] = [
    _Hiding if finder is importlib.machinery.PathFinder else finder for finder in sys.meta_path
]
'''


def _requirements(name: str, extras: frozenset[str]) -> list[Requirement]:
    """``name``'s requirements that apply with ``extras`` on this interpreter."""
    try:
        texts = metadata.requires(name) or []
    except metadata.PackageNotFoundError:  # an optional dependency that is not installed
        return []
    environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
    return [
        req
        for req in map(Requirement, texts)
        if req.marker is None or any(req.marker.evaluate(env) for env in environments)
    ]


def install_closure(extra: str | None) -> set[str]:
    """The distributions (canonical names) ``pip install '.[extra]'`` brings, ``extra``
    None for the core install."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [("ranger-plugins", frozenset({extra} if extra else ()))]
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        todo += [(req.name, frozenset(req.extras)) for req in _requirements(name, extras)]
    return {name for name, _ in seen}


def simulated_install_env(tmp_path: Path, extra: str | None) -> dict[str, str]:
    """Environment variables for a subprocess that sees only ``pip install '.[extra]'``."""
    allowed = install_closure(extra)
    modules = metadata.packages_distributions()
    hidden_modules = {
        module
        for module, dists in modules.items()
        if not any(canonicalize_name(d) in allowed for d in dists)
    }
    hidden_distributions = {
        canonicalize_name(dist.metadata["Name"])
        for dist in metadata.distributions()
        if canonicalize_name(dist.metadata["Name"]) not in allowed
    }
    site = tmp_path / f"site-{extra or 'core'}"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return {
        "PYTHONPATH": str(site),
        "RANGER_TEST_HIDDEN_MODULES": ",".join(sorted(hidden_modules)),
        "RANGER_TEST_HIDDEN_DISTRIBUTIONS": ",".join(sorted(hidden_distributions)),
    }


def run_python(
    tmp_path: Path, *args: str, extra: str | None = None, env=None, python=None, cwd=None
):
    """Run ``python *args`` in ``cwd`` (default ``tmp_path``) as on an install of ``extra``
    (None: core); the simulation's files go in ``tmp_path``."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    environment.pop("PYTHONPATH", None)
    if python is None:  # the dev venv, with the install simulated
        environment.update(simulated_install_env(tmp_path, extra))
    environment.update(env or {})
    return subprocess.run(
        [python or sys.executable, *args],
        cwd=cwd or tmp_path,  # not the repository: `-m` imports the installed package
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _core(tmp_path: Path, *args: str, env=None):
    """Run on the core install: the real one in CI if given, else the simulated one."""
    return run_python(tmp_path, *args, env=env, python=REAL_CORE_PYTHON)


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


# --- the simulation itself -------------------------------------------------------------


def test_the_closures_follow_the_extras():
    core = install_closure(None)
    assert {"ranger-plugins", "torch"} <= core
    assert not {"fastai", "lightning", "scikit-learn", "matplotlib", "torchvision"} & core
    lightning = install_closure("lightning")
    assert {"lightning", "jsonargparse", "torch"} <= lightning and "fastai" not in lightning
    fastai = install_closure("fastai")
    assert {"fastai", "torchvision", "scikit-learn"} <= fastai and "lightning" not in fastai
    assert {"fastai", "lightning", "scikit-learn", "matplotlib"} <= install_closure("recipes")


def test_the_simulation_hides_what_the_install_lacks(tmp_path):
    code = textwrap.dedent(
        """
        import importlib.util
        from importlib import metadata
        import torch, ranger_plugins
        assert importlib.util.find_spec("fastai") is None
        assert importlib.util.find_spec("sklearn") is None
        try:
            metadata.version("lightning")
        except metadata.PackageNotFoundError:
            print("hidden")
        """
    )
    result = run_python(tmp_path, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hidden"


# --- the core install ------------------------------------------------------------------

STEP_RANGER = textwrap.dedent(
    """
    import torch
    import ranger_plugins
    from ranger_plugins import Lookahead, Ranger
    from ranger_plugins.schedules import FlatCosineLR

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = Ranger(model.parameters(), lr=1e-2)
    scheduler = FlatCosineLR(opt, total_steps=12)
    before = model.weight.detach().clone()
    for _ in range(12):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        scheduler.step()
    with opt.slow_weights():
        pass
    assert not torch.equal(model.weight, before)
    Lookahead(torch.optim.SGD(model.parameters(), lr=0.1)).step()
    print("stepped", ranger_plugins.__version__)
    """
)


def test_core_install_imports_and_steps_ranger(tmp_path):
    result = _core(tmp_path, "-c", STEP_RANGER)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stepped 0.1.0"


@pytest.mark.parametrize("engine", ["fastai", "lightning"])
def test_core_install_recipes_name_the_extra(tmp_path, engine):
    result = _core(tmp_path, "-m", "ranger_plugins.recipes", "--engine", engine)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("error:") == 1
    line = _last_line(result)
    assert line.startswith("python -m ranger_plugins.recipes: error: the recipes need fastai")
    assert line.endswith("pip install '.[recipes]' (in a clone of ranger_plugins)")
    assert "== recipe" not in result.stdout  # stopped before the first run
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "site-core"])  # no plot written


@pytest.mark.parametrize(
    ("example", "extra"),
    [("fastai_digits.py", "fastai"), ("lightning_digits.py", "lightning"),
     ("lightning_cli.py", "lightning")],
)  # fmt: skip
def test_core_install_examples_name_their_extra(tmp_path, example, extra):
    result = _core(tmp_path, str(EXAMPLES / example), "fit")  # "fit": lightning_cli's command
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr  # one line, no traceback
    assert _last_line(result).startswith("error: this example needs")
    assert _last_line(result).endswith(f"pip install '.[{extra}]'")


def test_core_install_runs_the_plain_torch_example(tmp_path):
    result = _core(tmp_path, str(EXAMPLES / "plain_torch.py"), env={"EXAMPLE_QUICK": "1"})
    assert result.returncode == 0, result.stderr
    assert "epoch 1: train loss" in result.stdout


def test_core_install_lightning_adapter_names_the_extra(tmp_path):
    result = _core(tmp_path, "-c", "import ranger_plugins.lightning")
    assert result.returncode == 1
    assert _last_line(result).startswith("ImportError: ranger_plugins.lightning needs Lightning")
    assert "[lightning]" in _last_line(result)


def test_core_install_fastai_adapter_names_the_extra(tmp_path):
    result = _core(tmp_path, "-c", "import ranger_plugins.fastai")
    assert result.returncode == 1
    assert _last_line(result).startswith("ImportError: ranger_plugins.fastai needs fastai")
    assert "[fastai]" in _last_line(result)


# --- an install of one extra -----------------------------------------------------------


def test_lightning_extra_alone_runs_the_recipes_up_to_the_extras_check(tmp_path):
    result = run_python(
        tmp_path, "-m", "ranger_plugins.recipes", "--engine", "lightning", extra="lightning"
    )
    assert result.returncode == 2
    assert "the recipes need fastai, matplotlib, scikit-learn, not installed here" in (
        _last_line(result)
    )


@pytest.mark.parametrize("extra", ["recipes", "all"])
def test_recipes_extra_has_everything_the_main_job_imports(tmp_path, extra):
    # A bad suffix is the first check after the packages: reaching it means none is missing.
    result = run_python(
        tmp_path, "-m", "ranger_plugins.recipes", "--output", "plot.txt", extra=extra
    )
    assert result.returncode == 2
    assert "matplotlib cannot write '.txt' files" in _last_line(result)
    result = run_python(
        tmp_path, "-m", "ranger_plugins.recipes", "--engine", "lightning", "--output", "x.txt",
        extra=extra,
    )  # fmt: skip
    assert "matplotlib cannot write '.txt' files" in _last_line(result)
