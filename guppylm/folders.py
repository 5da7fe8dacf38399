"""Model names that mean folders, and output folders that never destroy what guppylm did not write.

`local_model` decides, before anything heavy is imported, whether a model name means a folder on this machine
(then it must exist: no Hub lookup, no network) or a Hub repo id.

Every command that writes a folder (train, dataset build, the exports, serve-web's bundle) goes through here:

- `check_output_folder` before any expensive work: the folder must be new, empty, or one guppylm wrote of the same
  kind - and then `overwrite` must be given. Anything else (a project folder, the repository root, the installed
  package) is refused, whatever the flags, in one line naming it. The parent must be writable.
- `writing_folder` for the writing itself: the contents go into a hidden sibling folder and are swapped in at the
  end, so an interrupt or a crash leaves the old folder as it was (or no folder). Files in the old folder that
  guppylm does not write (a user's notes) move into the new one; guppylm's own old files are replaced or dropped.
"""

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

PACKAGE_ROOTS = [Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "dataset_builder"]
DEFAULT_MODEL = "runs/guppy"  # where `make demo` / `guppylm train` put the model
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
LOCAL_ROOTS = ("runs",)  # where guppylm writes models: a name under it is a folder, never a Hub repo


def default_model():
    """The model to load when none is named: $GUPPYLM_MODEL, else the one `make demo` trained."""
    return os.environ.get("GUPPYLM_MODEL") or DEFAULT_MODEL


def is_local(name):
    """Whether a model name means a folder on this machine, which is then never looked up on the Hub.

    A Hub repo id is exactly `namespace/name`. Anything else is a folder: a name that exists here, an absolute or
    `.`/`~` path, one with more or fewer than one `/`, or one whose first part is a local folder or `runs/`."""
    first = name.split("/", 1)[0]
    return (
        os.path.exists(name)
        or name.startswith((".", "/", "~"))
        or name.count("/") != 1
        or first in LOCAL_ROOTS
        or os.path.isdir(first)
    )


def local_model(name=None):
    """The model to load: a complete local folder (as a path string) or a Hub repo id. A local-looking name that is
    missing or incomplete raises FileNotFoundError at once, saying what to do."""
    name = str(name or default_model())
    if not is_local(name):
        return name
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"no model at {name} - train one with `guppylm train` or pass --model")
    missing = [file for file in MODEL_FILES if not (folder / file).is_file()]
    if missing:
        raise FileNotFoundError(f"{name!r} is not a complete model folder: missing {', '.join(missing)}")
    return str(folder)


class FolderError(ValueError):
    """An output folder guppylm must not write; the message is one line that names it."""


@dataclass(frozen=True)
class FolderKind:
    what: str  # "model folder", "dataset", ...: for messages
    signature: str  # a file only guppylm writes into such a folder, so its presence says "ours"
    files: tuple  # top-level names or patterns of everything guppylm writes there


def is_ours(path, kind):
    return Path(path, kind.signature).is_file()


def check_output_folder(path, kind, overwrite=False):
    """Raise FolderError unless `path` may receive a new `kind` folder; returns `path` as a Path."""
    path = Path(path)
    resolved = path.resolve()
    for root in PACKAGE_ROOTS:
        if resolved == root or root in resolved.parents:
            raise FolderError(f"{path} is inside guppylm's own source ({root}); choose another output folder")
    if path.exists() and not path.is_dir():
        raise FolderError(f"{path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not is_ours(path, kind):
            raise FolderError(f"{path} is not empty and is not a {kind.what} guppylm wrote; choose another output folder")
        if not overwrite:
            raise FolderError(f"{path} already holds a {kind.what}; pass --overwrite to replace it")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FolderError(f"cannot write to {path}: {parent} is not writable")
    return path


@contextmanager
def writing_folder(path, kind, overwrite=False):
    """Yield an empty staging folder; when the block ends without error it becomes `path` (see the module doc)."""
    path = check_output_folder(path, kind, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not path.exists():
        os.replace(staging, path)
        return
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    os.replace(path, old)
    os.replace(staging, path)
    for entry in old.iterdir():  # what the user put there stays
        if not any(fnmatch(entry.name, pattern) for pattern in kind.files) and not (path / entry.name).exists():
            os.replace(entry, path / entry.name)
    shutil.rmtree(old, ignore_errors=True)
