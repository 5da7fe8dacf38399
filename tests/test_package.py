"""The package as a user installs it: the wheel built from this checkout, in a fresh environment, run from a folder
that holds nothing of the checkout. Every file the package reads at run time (the model card template, the persona
packs, the dataset card template) must come with the wheel.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO_ROOT, guppylm_command
from packaging.utils import canonicalize_name

from guppylm.card import TESTED_TRANSFORMERS

sys.path.insert(0, str(REPO_ROOT / "tests" / "compat"))
from matrix import UV, torch_wheel  # noqa: E402

BUILD_INPUTS = ["pyproject.toml", "README.md", "guppylm", "dataset_builder"]  # what setuptools reads for the wheel


HEAVY = {"torch", "transformers", "accelerate", "datasets", "huggingface_hub", "gradio"}


@pytest.mark.parametrize("args", [["--help"], ["train", "--max-steps", "many"]], ids=["help", "argument-error"])
def test_help_and_argument_errors_import_no_heavy_library(args):
    """`guppylm --help` and a mistyped argument answer at once: only the handlers import torch and the rest."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *guppylm_command(*args)[1:]], capture_output=True, text=True, timeout=60
    )
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert {"argparse", "guppylm"} <= imported  # -X importtime listed the imports
    assert not imported & HEAVY, sorted(imported & HEAVY)
    if args == ["--help"]:
        assert result.returncode == 0 and "train" in result.stdout
    else:
        assert result.returncode == 2 and "guppylm train: error: argument --max-steps: invalid int value: 'many'" in result.stderr


def pins(path):
    """name -> version of each `name==version` line of a requirements or constraints file."""
    lines = [line.split("#")[0].strip() for line in Path(path).read_text().splitlines()]
    return {canonicalize_name(line.split("==")[0]): line.split("==")[1] for line in lines if "==" in line}


def test_the_space_installs_the_versions_make_setup_installs():
    setup = pins(REPO_ROOT / "constraints.txt")
    setup["torch"] = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", (REPO_ROOT / "Makefile").read_text(), re.M).group(1)
    space = pins(REPO_ROOT / "space" / "requirements.txt")
    assert {"torch", "transformers", "gradio"} <= space.keys()
    assert space == {name: setup.get(name) for name in space}
    assert f"sdk_version: {setup['gradio']}\n" in (REPO_ROOT / "space" / "README.md").read_text()


def build_wheel(root):
    """The wheel, built from a copy of the checkout (the build's egg-info and build/ never land in the checkout)."""
    (root / "source").mkdir()
    for name in BUILD_INPUTS:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, root / "source" / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(REPO_ROOT / name, root / "source" / name)
    subprocess.run([*UV, "build", "-q", "--wheel", "--out-dir", str(root / "dist"), str(root / "source")], check=True)
    (wheel,) = (root / "dist").glob("guppylm-*.whl")
    return wheel


def installed_versions(python):
    listing = subprocess.run([python, "-m", "pip", "list", "--format", "json"], check=True, capture_output=True, text=True)
    return {canonicalize_name(p["name"]): p["version"] for p in json.loads(listing.stdout)}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh environment as a user has it (pip, torch, the transformers constraints.txt pins and its dependencies),
    what `pip install guppylm-….whl` would change there, and then the wheel installed (versions from constraints.txt)."""
    root = tmp_path_factory.mktemp("package")
    wheel, python = build_wheel(root), str(root / "venv" / "bin" / "python")
    subprocess.run([*UV, "venv", "-q", "--seed", "--python", sys.executable, str(root / "venv")], check=True)
    install = [*UV, "pip", "install", "-q", "--python", python, "-c", str(REPO_ROOT / "constraints.txt")]
    subprocess.run([*install, str(torch_wheel()), "transformers"], check=True)
    before = installed_versions(python)
    dry_run = [python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", str(wheel)]  # the user's command
    report = json.loads(subprocess.run(dry_run, check=True, capture_output=True, text=True).stdout)
    would_install = {canonicalize_name(p["metadata"]["name"]): p["metadata"]["version"] for p in report["install"]}
    subprocess.run([*install, str(wheel)], check=True)
    return SimpleNamespace(bin=Path(python).parent, before=before, would_install=would_install)


@pytest.mark.slow
def test_pip_install_beside_the_current_transformers_changes_none_of_the_installed_packages(installed):
    assert installed.before["transformers"] == pins(REPO_ROOT / "constraints.txt")["transformers"]
    assert "guppylm" in installed.would_install and "datasets" in installed.would_install  # what it did resolve
    changed = {name: (installed.before[name], version) for name, version in installed.would_install.items() if name in installed.before}
    assert not changed, f"installing guppylm would replace (installed, new): {changed}"


@pytest.mark.slow
def test_the_installed_wheel_builds_trains_chats_and_pushes_from_any_folder(installed, hub, tmp_path):
    bin_dir = installed.bin
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(command, env=hub.env(PYTHONPATH=None)):  # by default nothing of the checkout on the path
        result = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
        assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
        return result.stdout

    where = run([bin_dir / "python", "-c", "from importlib.util import find_spec as f; print(f('guppylm').origin, f('dataset_builder').origin)"])
    assert all(Path(path).is_relative_to(bin_dir.parent) for path in where.split()), where  # site-packages, not here

    run([bin_dir / "guppylm", "dataset", "build", "--output-dir", "data", "--num-samples", "2000", "--test-size", "200"])
    assert "# Guppy" in (elsewhere / "data" / "README.md").read_text()  # the dataset card, from the packaged template

    run([bin_dir / "guppylm", "train", "--preset", "tiny", "--max-steps", "20", "--dataset", "data", "--output-dir", "runs/guppy"])
    card = (elsewhere / "runs" / "guppy" / "README.md").read_text()
    assert "{{" not in card and "held-out prompts" in card  # rendered, with the evaluation of the packaged persona
    assert f"transformers {', '.join(TESTED_TRANSFORMERS)};" in " ".join(card.split())

    # the installed chat answers exactly as the checkout's does with the same model and seed
    chat = ["chat", "--model", "runs/guppy", "--prompt", "is the water warm?", "--seed", "0"]
    reply = run([bin_dir / "guppylm", *chat])
    assert reply.startswith("guppy> ") and reply == run(guppylm_command(*chat), env=hub.env())

    out = run([bin_dir / "guppylm", "push", "--model", "runs/guppy", "--repo-id", "guppy/from-the-wheel"])
    assert f"{hub.endpoint}/guppy/from-the-wheel" in out
    repo = hub.server.repos[("model", "guppy/from-the-wheel")]
    files = repo.commits[repo.branches["main"]].files
    assert {"model.safetensors", "modeling_guppylm.py", "loss_curve.png"} <= set(files)
    pushed_card = files["README.md"].content.decode()
    assert 'from_pretrained("guppy/from-the-wheel"' in pushed_card  # re-rendered for the repo at push time
