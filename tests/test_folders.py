"""guppylm.folders: an output folder is never one guppylm did not write, and is replaced whole or not at all."""

from pathlib import Path

import pytest

from guppylm.folders import FolderError, FolderKind, check_output_folder, writing_folder

KIND = FolderKind("model folder", signature="summary.json", files=("summary.json", "*.safetensors", "stale.txt"))


def write_model(folder, weights=b"new"):
    (folder / "summary.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(weights)


def test_a_new_folder_appears_whole(tmp_path):
    target = tmp_path / "runs" / "guppy"
    with writing_folder(target, KIND) as staging:
        assert not target.exists()  # nothing shows until the block has finished
        write_model(staging)
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors", "summary.json"]
    assert [p.name for p in target.parent.iterdir()] == ["guppy"]  # no staging folder left behind


def test_a_failure_half_way_leaves_the_old_folder_untouched(tmp_path):
    target = tmp_path / "guppy"
    with writing_folder(target, KIND) as staging:
        write_model(staging, b"old")
    with pytest.raises(KeyboardInterrupt):
        with writing_folder(target, KIND, overwrite=True) as staging:
            (staging / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert (target / "model.safetensors").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["guppy"]


def test_a_folder_guppylm_did_not_write_is_refused_even_with_overwrite(tmp_path):
    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    (project / "checkpoints" / "llama_finetune_epoch9.pt").write_bytes(b"precious")
    for overwrite in (False, True):
        with pytest.raises(FolderError, match="is not empty and is not a model folder guppylm wrote"):
            check_output_folder(project, KIND, overwrite=overwrite)
    assert (project / "checkpoints" / "llama_finetune_epoch9.pt").read_bytes() == b"precious"


def test_our_own_folder_needs_overwrite_and_keeps_the_users_files(tmp_path):
    target = tmp_path / "guppy"
    with writing_folder(target, KIND) as staging:
        write_model(staging, b"old")
        (staging / "stale.txt").write_text("an output the next run does not write")
    (target / "my-notes.md").write_text("mine")
    with pytest.raises(FolderError, match="already holds a model folder; pass --overwrite"):
        check_output_folder(target, KIND)
    with writing_folder(target, KIND, overwrite=True) as staging:
        write_model(staging, b"new")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors", "my-notes.md", "summary.json"]
    assert (target / "model.safetensors").read_bytes() == b"new" and (target / "my-notes.md").read_text() == "mine"


def test_the_package_and_files_are_refused(tmp_path):
    import guppylm

    package = Path(guppylm.__file__).parent
    for inside in (package, package / "new-model"):
        with pytest.raises(FolderError, match="inside guppylm's own source"):
            check_output_folder(inside, KIND, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FolderError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "file", KIND)
