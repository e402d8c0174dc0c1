"""A crash while a checkpoint is being written: nothing half-written becomes `latest`, and the same
command resumes from the last complete checkpoint and finishes. Also: a save folder that cannot be
written fails at start-up with one clear message.

Composer 0.32.1 writes `ep{E}-ba{B}-rank0.pt` in place (`open(path, "wb")` + `torch.save`, no temp
file, no fsync) and only then replaces the `latest-rank0.pt` symlink (remove + symlink), so a crash
during the write leaves a truncated file that `latest` does not point to.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from tests.reliability.conftest import (REPO, fault_hook_env, load_checkpoint, run_train, start_train,
                                        trained_batches, wait_until)

# The checkpoint writer crashes (SIGKILL of its own process) after `fraction` of the bytes of the
# batch-`batch` checkpoint are on disk: the exact state a preemption during the write leaves.
CRASH_WHILE_WRITING = '''
import os, signal

def patch(module):
    original = module._write_checkpoint_file
    def write_then_crash(state_dict, filename):
        original(state_dict, filename)
        if os.path.basename(filename) == os.environ["FAULT_CHECKPOINT_NAME"]:
            size = os.path.getsize(filename)
            with open(filename, "r+b") as f:
                f.truncate(int(size * float(os.environ["FAULT_FRACTION"])))
            os.kill(os.getpid(), signal.SIGKILL)
    module._write_checkpoint_file = write_then_crash
'''

def _is_complete_zip(path: Path) -> bool:
    # torch.save writes a zip whose central directory is the last thing written: a truncated file
    # has none.
    return zipfile.is_zipfile(path)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("fraction", [0.5, 1.0], ids=["mid-write", "written-before-latest-moved"])
def test_crash_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path, demo_data, fraction):
    """The interrupted file is newer than `latest`; Composer refuses to start next to such a file
    unless overwriting is on, which the builder turns on under autoresume."""
    ckpt = tmp_path / "ckpt"
    common = ("max_duration=12ba", f"checkpoint.save_folder={ckpt}", "checkpoint.save_interval=4ba",
              "checkpoint.keep_local=null")
    env = fault_hook_env(tmp_path / "hook", "composer.utils.checkpoint", CRASH_WHILE_WRITING)
    crashed = run_train(demo_data, tmp_path, *common,
                        env={**env, "FAULT_CHECKPOINT_NAME": "ep0-ba8-rank0.pt", "FAULT_FRACTION": str(fraction)})
    assert crashed.returncode == -9, f"the injected crash should SIGKILL the trainer: {crashed.tail()}"
    assert os.readlink(ckpt / "latest-rank0.pt") == "ep0-ba4-rank0.pt", "latest moved to a checkpoint being written"
    assert _is_complete_zip(ckpt / "ep0-ba4-rank0.pt")
    assert _is_complete_zip(ckpt / "ep0-ba8-rank0.pt") == (fraction == 1.0)

    resumed = run_train(demo_data, tmp_path, *common)
    assert resumed.returncode == 0, resumed.tail()
    assert trained_batches(tmp_path / "run")[-8:] == list(range(4, 12)), trained_batches(tmp_path / "run")
    for batch in (8, 12):
        state = load_checkpoint(ckpt / f"ep0-ba{batch}-rank0.pt")["state"]
        assert state["timestamp"]["Timestamp"]["batch"] == batch
    assert os.readlink(ckpt / "latest-rank0.pt") == "ep0-ba12-rank0.pt"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_racing_the_checkpoint_write_never_leaves_latest_on_a_partial_file(tmp_path, demo_data):
    """No injection: SIGKILL the trainer the moment the new checkpoint file appears (polled every
    millisecond). Wherever the kill lands, `latest` names a complete checkpoint or nothing."""
    ckpt = tmp_path / "ckpt"
    target = ckpt / "ep0-ba4-rank0.pt"
    launch = start_train(demo_data, tmp_path, "max_duration=8ba", f"checkpoint.save_folder={ckpt}",
                         "checkpoint.save_interval=4ba")
    wait_until(launch, target.exists, what="the batch-4 checkpoint file", poll_s=0.001)
    launch.sigkill()
    latest = ckpt / "latest-rank0.pt"
    size = target.stat().st_size
    if latest.is_symlink():
        assert _is_complete_zip(ckpt / os.readlink(latest)), f"latest -> partial file ({size} bytes)"
        load_checkpoint(ckpt / os.readlink(latest))
    print(f"killed with {size} bytes of the checkpoint on disk, complete={_is_complete_zip(target)}, "
          f"latest={'-> ' + os.readlink(latest) if latest.is_symlink() else 'absent'}")


@pytest.mark.timeout(300)
def test_save_folder_blocked_by_a_file_fails_at_start_up(tmp_path, demo_data):
    """A file where the checkpoint folder should be: the run stops before the first batch with a
    message naming the folder and the cause."""
    blocker = tmp_path / "ckpt"
    blocker.write_text("not a folder")
    result = run_train(demo_data, tmp_path, "max_duration=4ba", f"checkpoint.save_folder={blocker}/run1",
                       timeout_s=200)
    assert result.returncode != 0, result.tail()
    assert f"checkpoint folder {blocker}/run1 is not writable: Not a directory" in result.output, result.tail()
    assert trained_batches(tmp_path / "run") == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_storage_error_at_start_up_is_one_message_and_exit_2(tmp_path, demo_data):
    """CheckpointStorageError is a RuntimeError: the CLI catches it like a bad setting."""
    blocker = tmp_path / "ckpt"
    blocker.write_text("not a folder")
    result = run_train(demo_data, tmp_path, "max_duration=4ba", f"checkpoint.save_folder={blocker}/run1",
                       timeout_s=200)
    assert result.returncode == 2, result.tail()
    assert "Traceback" not in result.output, result.tail()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: the read-only check "
                    "cannot fail as root (the file-in-the-way test covers the same code path)")
@pytest.mark.timeout(300)
def test_read_only_save_folder_fails_at_start_up(tmp_path, demo_data):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    result = run_train(demo_data, tmp_path, "max_duration=4ba", f"checkpoint.save_folder={folder}",
                       timeout_s=180)
    assert result.returncode != 0 and f"checkpoint folder {folder} is not writable" in result.output, result.tail()


def test_not_enough_disk_for_checkpoints_fails_before_training(tmp_path):
    """Disk full is checked by free space before the first step (preflight needs 1 GiB by default);
    shown on the function the CLI calls, with a threshold above what any disk has free."""
    from modernbert_train.train.checkpointing import CheckpointStorageError, preflight_save_folder
    with pytest.raises(CheckpointStorageError, match=r"GiB free, less than the .* GiB required"):
        preflight_save_folder(str(tmp_path / "ckpt"), tmp_path / "run", min_free_bytes=1 << 60)


# --------------------------------------------------------------------------------------------
# Trust: Composer checkpoints are pickles; Hugging Face export/import use safetensors only
# --------------------------------------------------------------------------------------------

class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_readme_warns_that_checkpoints_are_pickles_and_names_safetensors():
    readme = (REPO / "README.md").read_text()
    assert "Composer checkpoints are Python pickles; loading one can run arbitrary code" in readme
    assert "HF export and import use safetensors only" in readme


def test_import_hf_refuses_a_pickled_weights_file_without_unpickling_it(tmp_path):
    import pickle

    import torch

    from modernbert_train.model.config import preset
    from modernbert_train.model.hf_interop import export_hf, import_hf
    from modernbert_train.model.modernbert import ModernBertForMaskedLM

    torch.manual_seed(0)
    folder = tmp_path / "hf"
    export_hf(ModernBertForMaskedLM(preset("tiny")), folder)
    written = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in written and not [n for n in written if n.endswith((".bin", ".pt", ".pkl"))], written
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:  # parses, never unpickles
        assert "model.embeddings.tok_embeddings.weight" in set(f.keys())

    # A released-style folder with only pytorch_model.bin (a pickle that would run code).
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pickle-code-ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCodeWhenUnpickled(marker)))
    with pytest.raises(FileNotFoundError, match="only safetensors checkpoints are loaded"):
        import_hf(folder)
    assert not marker.exists(), "import_hf unpickled pytorch_model.bin"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_composer_checkpoint_is_a_pickle_that_weights_only_loading_refuses(tmp_path, demo_data):
    """Why the README warns: our checkpoints hold Python objects beyond tensors, so only the unsafe
    full unpickling loads them."""
    import pickle

    import torch
    ckpt = tmp_path / "ckpt"
    result = run_train(demo_data, tmp_path, "max_duration=2ba", f"checkpoint.save_folder={ckpt}",
                       "checkpoint.save_interval=2ba")
    assert result.returncode == 0, result.tail()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(ckpt / "ep0-ba2-rank0.pt", map_location="cpu", weights_only=True)
    assert load_checkpoint(ckpt / "ep0-ba2-rank0.pt")["state"]["timestamp"]["Timestamp"]["batch"] == 2
