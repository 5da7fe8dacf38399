"""`make compat-lowest`: the fast tests with the lowest versions pyproject.toml allows.

uv resolves guppylm's requirements, every extra included, with `--resolution lowest-direct`: each dependency named
in pyproject.toml at its lower bound, the rest at the newest release that fits them. torch stays the version
installed here (the CPU wheel: PyPI's older torch wheels for Linux are the CUDA builds, gigabytes each). The
environment is made once per set of requirements under ~/.cache/guppylm/compat (matrix.venv), and this checkout
runs from PYTHONPATH, so what passes is this tree's code with those versions.

    python tests/compat/lowest.py                                # the fast tests, on 2 workers (pytest-xdist)
    python tests/compat/lowest.py tests/test_model.py -k cache    # any pytest arguments instead
"""

import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from matrix import UV, venv
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
# The fast tests are small models and short-lived processes, one thread each: two workers on two cores halve the wall
# time, and each builds the session fixtures (a tiny trained model, a small dataset) for itself.
FAST = ["-m", "not slow and not browser", "-n", "2"]


def declared():
    """pyproject.toml's requirements (the dependencies and every extra's) and the names of its extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return project["dependencies"] + [r for extra in extras.values() for r in extra], list(extras)


def environment():
    """The cached lowest-direct environment for today's pyproject.toml (changed requirements make a new one)."""
    requirements, extras = declared()
    key = hashlib.sha256(json.dumps(requirements).encode()).hexdigest()[:12]
    options = [option for extra in extras for option in ("--extra", extra)]
    return venv(f"lowest-{key}", ["--resolution", "lowest-direct", "-r", str(ROOT / "pyproject.toml"), *options])


def installed(python):
    """name -> version of every package in `python`'s environment."""
    freeze = subprocess.run([*UV, "pip", "freeze", "--python", str(python)], check=True, capture_output=True, text=True)
    pairs = [line.split("==", 1) for line in freeze.stdout.splitlines() if "==" in line]
    return {canonicalize_name(name): version for name, version in pairs}


def lower_bounds():
    """name -> the version of each declared `>=` bound (torch's aside: it stays the CPU wheel installed here)."""
    bounds = {}
    for requirement in map(Requirement, declared()[0]):
        for specifier in requirement.specifier:
            if specifier.operator == ">=" and canonicalize_name(requirement.name) != "torch":
                bounds[canonicalize_name(requirement.name)] = specifier.version
    return bounds


def unrunnable(versions):
    """Tests these versions cannot run on a machine that reaches only 127.0.0.1: test -> why (a library's limit)."""
    if Version(versions["huggingface-hub"]) < Version("2.2"):
        why = "huggingface_hub < 2.2 checks a card at huggingface.co whatever HF_ENDPOINT says, not at the tests' local Hub"
        tests = ["test_hub.py::test_model_push_pull_repush_and_offline", "test_hub.py::test_dataset_push_then_load_dataset_and_train_offline",
                 "test_hub.py::test_space_push_configures_the_model_and_mirrors_the_folder", "test_train.py::test_a_pack_file_travels_with_its_model"]
        return {f"tests/{test}": why for test in tests}
    return {}


def main(pytest_arguments):
    python = environment()
    versions, bounds = installed(python), lower_bounds()
    print("lowest versions: " + ", ".join(f"{name} {versions.get(name)}" for name in sorted(bounds)), flush=True)
    above = [f"{name}>={bound} installs as {versions.get(name)}" for name, bound in bounds.items() if Version(versions.get(name, "0")) != Version(bound)]
    if above:  # uv went higher to satisfy the other requirements: the bound claims more than this run tests
        sys.exit("raise these lower bounds in pyproject.toml to what installs: " + "; ".join(above))
    skipped = unrunnable(versions)
    for test, why in skipped.items():
        print(f"deselected {test}: {why}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    deselect = [option for test in skipped for option in ("--deselect", test)]
    command = [str(python), "-m", "pytest", "-p", "no:cacheprovider", *deselect, *(pytest_arguments or FAST)]
    sys.exit(subprocess.run(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL).returncode)


if __name__ == "__main__":
    main(sys.argv[1:])
