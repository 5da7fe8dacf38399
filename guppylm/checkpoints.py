"""Checkpoints of a run in progress, kept beside its model folder so that the model folder holds exactly what a
Hub repo should (`hf upload you/guppy runs/guppy` publishes no optimizer state and no pickle):

    runs/guppy/                        the model: written once, at the end, atomically
    runs/guppy.checkpoints/            this run's checkpoints, removed once the model folder is complete
        recipe.json                    the settings that made them: a resume must use the same
        step-0000500/                  accelerator.save_state (weights, optimizer, schedule, RNG states)
            training_state.json        the run so far: step, tokens, seconds, loss history (JSON, not a pickle)

A checkpoint is written into `.partial-step-N` and renamed, so a crash mid-write never destroys the last good one,
and only complete `step-N` folders are ever resumed from. Resuming unpickles accelerate's optimizer and RNG state
(`torch.load(weights_only=True)`): resume only runs you started yourself.
"""

import json
import os
import shutil
from pathlib import Path

from guppylm.folders import FolderError, FolderKind, check_output_folder

CHECKPOINT_FOLDER = FolderKind("checkpoint folder", "recipe.json", ("recipe.json", "step-*", ".partial-*"))
STATE = "training_state.json"


def checkpoint_dir(output_dir):
    """OUTPUT_DIR.checkpoints, beside the model folder."""
    path = Path(output_dir)
    if path.name in ("", ".", ".."):  # "." has no name to extend
        path = Path(os.path.abspath(path))
    return path.with_name(path.name + ".checkpoints")


def latest_checkpoint(output_dir):
    """(step, path) of the newest complete checkpoint, or (0, None). Incomplete ones never carry the final name."""
    steps = [(int(p.name[5:]), p) for p in checkpoint_dir(output_dir).glob("step-*") if p.name[5:].isdigit()]
    return max(steps) if steps else (0, None)


def check_checkpoints(output_dir, recipe, resume, overwrite):
    """Before any work: the checkpoint to resume from (or None), or a FolderError saying what to pass.

    Checkpoints of an unfinished run are never dropped silently: they need --resume (same recipe) or --overwrite."""
    folder = checkpoint_dir(output_dir)
    check_output_folder(folder, CHECKPOINT_FOLDER, overwrite=True)  # refuses a folder guppylm did not write
    step, latest = latest_checkpoint(output_dir)
    if latest is None:
        return None
    if not (resume or overwrite):
        raise FolderError(f"{folder} holds an unfinished run (last checkpoint: step {step}); pass --resume to continue it or --overwrite to start over")
    if not resume:
        return None
    saved = json.loads((folder / CHECKPOINT_FOLDER.signature).read_text())
    differs = [key for key in saved if saved[key] != recipe.get(key)]
    if differs:
        key = differs[0]
        raise FolderError(f"the checkpoints in {folder} were made with {key} {saved[key]!r}, not {recipe.get(key)!r}; resume with the same settings, or pass --overwrite to start over")
    return latest


def start_checkpoints(output_dir, recipe):
    """Make the checkpoint folder for a run of `recipe` (a JSON-able dict); an earlier run's checkpoints (there only
    when --overwrite was given) are removed. Main process only."""
    folder = checkpoint_dir(output_dir)
    if latest_checkpoint(output_dir)[1] is not None:
        print(f"--overwrite: removing the earlier run's checkpoints in {folder}", flush=True)
        remove_checkpoints(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CHECKPOINT_FOLDER.signature).write_text(json.dumps(recipe, indent=2))


def remove_checkpoints(output_dir):
    shutil.rmtree(checkpoint_dir(output_dir), ignore_errors=True)


def save_checkpoint(accelerator, output_dir, state, keep=2):
    """accelerator.save_state plus `state` (the run so far, a JSON-able dict with "step") into a temporary folder,
    then an atomic rename; the `keep` newest checkpoints stay."""
    root = checkpoint_dir(output_dir)
    final, partial = root / f"step-{state['step']:07d}", root / f".partial-step-{state['step']:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
        if accelerator.is_main_process:
            (partial / STATE).write_text(json.dumps(state))
    except Exception as error:  # safetensors and torch.save word a full disk their own ways ("enforce fail ... unexpected pos")
        free = shutil.disk_usage(root).free
        raise OSError(f"cannot write checkpoint {partial} ({free:,} bytes free on its disk): {error}") from error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(partial, final)
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, path):
    """Restore weights, optimizer, schedule and RNG states from `path`; returns the run state saved with them."""
    accelerator.load_state(str(path))
    return json.loads(Path(path, STATE).read_text())
