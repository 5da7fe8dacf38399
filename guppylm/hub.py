"""Publish a trained Guppy, its dataset and its Space to the Hugging Face Hub.

Everything goes through huggingface_hub and datasets: they find the token (`--token`, HF_TOKEN or
`hf auth login`), honour HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE, and upload weights and parquet as LFS.
Pulling needs nothing from here: `from_pretrained("namespace/name")` and `load_dataset("namespace/name")`
already take a repo id; `hub_errors` only turns their failures into one line that a user can act on.
"""

import shutil
import tempfile
from fnmatch import fnmatch
from pathlib import Path

from guppylm.folders import MODEL_FILES as MODEL_REQUIRED
from guppylm.errors import HubError, hub_errors

# A model folder must hold MODEL_REQUIRED (what `load_model` needs); the rest (generation config, model card,
# loss curve) is published when present.
MODEL_FILES = ["*.safetensors", "*.json", "*.py", "*.md", "*.png", "*.jinja", "*.txt", "persona.yaml", "persona.*.yaml"]  # top level only; never .env
SPACE_REQUIRED = ["app.py", "README.md", "requirements.txt"]
# Build and run leftovers kept out of the Space: names at any depth, or paths from the folder's root
# (web/vendor and web/model are what `guppylm serve-web` generates for the browser page).
SPACE_SKIP = ["node_modules", "__pycache__", ".*", "*.pyc", "*.log", "flagged", "web/vendor", "web/model"]
PACKAGE_DIR = Path(__file__).resolve().parent  # app.py imports guppylm, so the Space gets a copy
SPACE_DIR = PACKAGE_DIR.parent / "space"  # the checkout's space/
SPACE_MODEL_VARIABLE = "GUPPYLM_MODEL"  # app.py loads the model named by this Space variable


def _api(token):
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE=1 is set; unset it to push to the Hub")
    if token is None and get_token() is None:  # fail before any upload, not on the first 401
        raise HubError("no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`")
    return HfApi(token=token, library_name="guppylm")


def _skip(root):
    """A copytree `ignore` for SPACE_SKIP."""

    def ignore(directory, names):
        where = Path(directory).relative_to(root)
        return [name for name in names if any(fnmatch(name, p) or fnmatch((where / name).as_posix(), p) for p in SPACE_SKIP)]

    return ignore


def _require(folder, names, what):
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{what} folder not found: {folder}")
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise HubError(f"{what} folder {folder} is missing {', '.join(missing)}")
    return folder


# --- push ----------------------------------------------------------------------------------------------


def push_model(model_dir, repo_id, private=False, token=None, revision=None):
    """Upload a `guppylm train` folder as a model repo that `from_pretrained(repo_id, trust_remote_code=True)` loads.

    Pushing again updates the repo in place: changed files get a new commit, unchanged ones are skipped,
    and stale weight files (say, old shards) are deleted.
    """
    import json

    from huggingface_hub import ModelCard

    from guppylm.card import write_model_card

    folder = _require(model_dir, MODEL_REQUIRED, "model")
    # auto_map names the remote code: "modeling_guppylm.GuppyForCausalLM" needs modeling_guppylm.py next to the weights
    auto_map = json.loads((folder / "config.json").read_text()).get("auto_map", {})
    refs = [ref for value in auto_map.values() for ref in (value if isinstance(value, list) else [value]) if ref]
    _require(folder, sorted({ref.split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in refs}), "model")

    api = _api(token)
    names = [path.name for path in folder.iterdir() if path.is_file() and any(path.match(pattern) for pattern in MODEL_FILES)]
    with tempfile.TemporaryDirectory() as staging, hub_errors(repo_id):
        for name in names:
            shutil.copy2(folder / name, staging)
        if (folder / "training_summary.json").is_file():  # re-render the card so its usage snippet names this repo
            write_model_card(staging, json.loads((folder / "training_summary.json").read_text()), repo_id=repo_id)
        if (Path(staging) / "README.md").is_file():  # the Hub checks the card's metadata: a bad card fails before the upload
            ModelCard.load(Path(staging) / "README.md").validate(repo_type="model")
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            delete_patterns=["*.safetensors", "*.safetensors.index.json"],
            revision=revision,
            commit_message="Upload GuppyLM model",
        )
    print(f"pushed {folder} to {url} ({commit.oid[:8]})")
    return str(url)


def push_dataset(dataset_dir, repo_id, private=False, token=None, revision=None):
    """Upload a `guppylm dataset build` folder as a dataset repo that `load_dataset(repo_id)` loads.

    datasets writes the parquet shards and the card's machine-readable part (configs, dataset_info);
    the folder's README.md supplies the rest of the card.
    """
    from datasets import load_dataset
    from huggingface_hub import DatasetCard, hf_hub_download

    folder = _require(dataset_dir, ["README.md"], "dataset")
    if not any(folder.rglob("*.parquet")):
        raise HubError(f"dataset folder {folder} holds no parquet files; build it with `guppylm dataset build`")
    dataset = load_dataset(str(folder))

    api = _api(token)
    with hub_errors(repo_id, "dataset"):
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        dataset.push_to_hub(repo_id, private=private, token=token, revision=revision, commit_message="Upload GuppyLM dataset")
        pushed = DatasetCard.load(hf_hub_download(repo_id, "README.md", repo_type="dataset", revision=revision, token=token))
        card = DatasetCard.load(folder / "README.md")
        for key in ("configs", "dataset_info"):  # datasets' view of the uploaded files wins
            if pushed.data.get(key) is not None:
                card.data[key] = pushed.data.get(key)
        card.push_to_hub(repo_id, repo_type="dataset", token=token, revision=revision, commit_message="Upload dataset card")
    print(f"pushed {folder} to {url}")
    return str(url)


def push_space(model_repo_id, repo_id, private=False, token=None, revision=None, space_dir=SPACE_DIR):
    """Upload `space/` and the guppylm package it imports as a Gradio Space that chats with `model_repo_id`.

    The card's `models:` links the Space to the model on the Hub; the Space variable GUPPYLM_MODEL tells
    app.py which model to load (set at creation, and updated on every push). The Space mirrors the folder:
    files deleted here are deleted there.
    """
    from huggingface_hub import SpaceCard

    if not Path(space_dir).is_dir():
        raise HubError(f"space folder not found at {space_dir}; `guppylm space push` runs from a GuppyLM source checkout")
    folder = _require(space_dir, SPACE_REQUIRED, "space")
    card = SpaceCard.load(folder / "README.md")
    card.data.sdk = card.data.get("sdk") or "gradio"
    card.data.models = [model_repo_id]

    api = _api(token)
    variable = {"key": SPACE_MODEL_VARIABLE, "value": model_repo_id}
    with hub_errors(repo_id, "space"), tempfile.TemporaryDirectory() as staging:
        card.validate(repo_type="space")  # asks the Hub, so a bad Space config fails before the upload
        staged = Path(shutil.copytree(folder, Path(staging) / "space", ignore=_skip(folder)))
        shutil.copytree(PACKAGE_DIR, staged / "guppylm", ignore=_skip(PACKAGE_DIR))
        card.save(staged / "README.md")
        url = api.create_repo(
            repo_id, repo_type="space", space_sdk=card.data.sdk, private=private, exist_ok=True, space_variables=[variable]
        )
        api.add_space_variable(repo_id, **variable)  # create_repo sets it only for a new Space
        if revision:
            api.create_branch(repo_id, repo_type="space", branch=revision, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="space",
            folder_path=staged,
            delete_patterns="*",  # huggingface_hub keeps .gitattributes
            revision=revision,
            commit_message=f"Deploy GuppyLM Space for {model_repo_id}",
        )
    print(f"pushed {folder} to {url} (loads {model_repo_id})")
    return str(url)
