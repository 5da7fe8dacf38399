"""`make compat-lowest`: the fast tests with the lowest versions pyproject.toml allows.

uv resolves guppylm's requirements, every extra included, with `--resolution lowest-direct`: each dependency named
in pyproject.toml at its lower bound, the rest at the newest release that fits them. torch stays the version
installed here (the CPU wheel: PyPI's older torch wheels for Linux are the CUDA builds, gigabytes each). The
environment is made once per set of requirements under ~/.cache/guppylm/compat (matrix.venv), and this checkout
runs from PYTHONPATH, so what passes is this tree's code with those versions.

    python tests/compat/lowest.py                                # the fast tests: -m "not slow and not browser"
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

ROOT = Path(__file__).resolve().parents[2]
FAST = ["-m", "not slow and not browser"]


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
    """'name version' of each declared requirement, as installed in `python`'s environment."""
    freeze = subprocess.run([*UV, "pip", "freeze", "--python", str(python)], check=True, capture_output=True, text=True)
    versions = dict(line.split("==", 1) for line in freeze.stdout.splitlines() if "==" in line)
    versions = {canonicalize_name(name): version for name, version in versions.items()}
    names = sorted({canonicalize_name(Requirement(r).name) for r in declared()[0]})
    return ", ".join(f"{name} {versions.get(name, 'MISSING')}" for name in names)


def main(pytest_arguments):
    python = environment()
    print(f"lowest versions: {installed(python)}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [str(python), "-m", "pytest", "-p", "no:cacheprovider", *(pytest_arguments or FAST)]
    sys.exit(subprocess.run(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL).returncode)


if __name__ == "__main__":
    main(sys.argv[1:])
