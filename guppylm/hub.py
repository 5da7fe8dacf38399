"""Publish a trained Guppy, its dataset and its Space to the Hugging Face Hub.

Everything goes through huggingface_hub and datasets: they find the token (`--token`, HF_TOKEN or
`hf auth login`), honour HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE, and upload weights and parquet as LFS.
Pulling needs nothing from here: `from_pretrained("namespace/name")` and `load_dataset("namespace/name")`
already take a repo id; `hub_errors` only turns their failures into one line that a user can act on.
"""

import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

# What a model folder from `guppylm train` must hold to load on the Hub; the rest (generation config,
# model card, loss curve) is published when present.
MODEL_REQUIRED = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
MODEL_FILES = ["*.safetensors", "*.json", "*.py", "*.md", "*.png", "*.jinja", "*.txt"]  # top level only; never .env
SPACE_REQUIRED = ["app.py", "README.md", "requirements.txt"]
SPACE_SKIP = ["node_modules", "__pycache__", ".*", "*.pyc", "*.log", "flagged"]  # build and run leftovers
SPACE_DIR = Path(__file__).resolve().parents[1] / "space"  # guppylm/hub.py -> the checkout's space/
SPACE_MODEL_VARIABLE = "GUPPYLM_MODEL"  # app.py loads the model named by this Space variable


class HubError(RuntimeError):
    """A Hub operation failed; the message is one line, safe to print (it never holds the token)."""


# --- errors -----------------------------------------------------------------------------------------


def _causes(error):
    """The error and the ones it was raised from, outermost first."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _explain(error, repo_id, repo_type):
    """One line for a failure anywhere under huggingface_hub / transformers / datasets, or None."""
    from httpx2 import TransportError
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        LocalTokenNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    datasets_errors = sys.modules.get("datasets.exceptions")  # only an imported datasets can have raised
    not_found = (RepositoryNotFoundError, *([datasets_errors.DatasetNotFoundError] if datasets_errors else []))
    network = (TransportError, ConnectionError, TimeoutError, LocalEntryNotFoundError)  # incl. OfflineModeIsEnabled
    where = f"{repo_type} repository '{repo_id}'"
    for cause in _causes(error):  # outermost first: the first one we recognise is the most specific
        if isinstance(cause, LocalTokenNotFoundError):
            return "no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`"
        if isinstance(cause, RevisionNotFoundError):
            return f"revision not found in {where} on {constants.ENDPOINT}"
        if isinstance(cause, not_found):
            return f"{where} not found on {constants.ENDPOINT} (check the id, and that your token can see it)"
        if isinstance(cause, HfHubHTTPError) and cause.response is not None and cause.response.status_code in (401, 403):
            if cause.response.status_code == 401:
                return f"the Hub at {constants.ENDPOINT} rejected the token (401): check --token, HF_TOKEN or `hf auth login`"
            return f"the token may not write to {where} (403): it needs write access to that namespace"
    for cause in _causes(error):
        if isinstance(cause, network) and constants.HF_HUB_OFFLINE:
            return f"HF_HUB_OFFLINE=1 and {where} is not in the cache ({constants.HF_HUB_CACHE}); go online once to download it"
        if isinstance(cause, network):
            return f"cannot reach the Hub at {constants.ENDPOINT} ({type(cause).__name__}); check the network, or set HF_HUB_OFFLINE=1 to use the cache"
    return None


@contextmanager
def hub_errors(repo_id, repo_type="model"):
    """Re-raise Hub failures as a one-line HubError; chat and train wrap `from_pretrained` / `load_dataset` in it."""
    try:
        yield
    except HubError:
        raise
    except Exception as error:
        message = _explain(error, repo_id, repo_type)
        if message is None:
            raise
        raise HubError(message) from None  # `from None`: the chained traceback would only repeat the URL


def _api(token):
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE=1 is set; unset it to push to the Hub")
    if token is None and get_token() is None:  # fail before any upload, not on the first 401
        raise HubError("no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`")
    return HfApi(token=token, library_name="guppylm")


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

    folder = _require(model_dir, MODEL_REQUIRED, "model")
    auto_map = json.loads((folder / "config.json").read_text()).get("auto_map", {})
    code = sorted({ref.split("--")[-1].split(".")[0] + ".py" for refs in auto_map.values() for ref in ([refs] if isinstance(refs, str) else refs) if ref})
    _require(folder, code, "model")  # auto_map points at these; without them trust_remote_code fails on the Hub

    api = _api(token)
    with hub_errors(repo_id):
        if (folder / "README.md").is_file():  # the Hub checks the card's metadata, so a bad card fails before the upload
            ModelCard.load(folder / "README.md").validate(repo_type="model")
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        names = [path.name for path in folder.iterdir() if path.is_file() and any(path.match(pattern) for pattern in MODEL_FILES)]
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=names,  # exact top-level names: no checkpoints, no dotfiles
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
    """Upload `space/` as a Gradio Space that chats with `model_repo_id`.

    The card's `models:` links the Space to the model on the Hub; the Space variable GUPPYLM_MODEL tells
    app.py which model to load (set at creation, and updated on every push).
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
        staged = Path(shutil.copytree(folder, Path(staging) / "space", ignore=shutil.ignore_patterns(*SPACE_SKIP)))
        card.save(staged / "README.md")
        url = api.create_repo(repo_id, repo_type="space", space_sdk=card.data.sdk, private=private, exist_ok=True, space_variables=[variable])
        api.add_space_variable(repo_id, **variable)  # create_repo sets it only for a new Space
        if revision:
            api.create_branch(repo_id, repo_type="space", branch=revision, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="space",
            folder_path=staged,
            delete_patterns="*",  # the Space mirrors space/ (huggingface_hub keeps .gitattributes)
            revision=revision,
            commit_message=f"Deploy GuppyLM Space for {model_repo_id}",
        )
    print(f"pushed {folder} to {url} (loads {model_repo_id})")
    return str(url)
