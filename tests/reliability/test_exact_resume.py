"""Exact resumption through the real CLI: a run SIGKILLed at several points and restarted with the
same command ends with weights bitwise equal to an uninterrupted run, having trained on the same
documents in the same order (none replayed, none skipped)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.reliability.conftest import (Launch, effective_trace, load_checkpoint, run_train, start_train,
                                        tensor_differences, traced_batch_seen, train_command, trained_batches,
                                        wait_until)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

MAX_BATCHES = 24
SAVE_EVERY = 8  # checkpoints at 8, 16, 24; the batch size doubles at batch 6 (warmup)


def _common(work: Path) -> tuple[str, ...]:
    return (f"max_duration={MAX_BATCHES}ba", f"checkpoint.save_folder={work}/ckpt",
            f"checkpoint.save_interval={SAVE_EVERY}ba", "checkpoint.keep_local=null",
            "logging.data_trace=true", "data.num_workers=1")


def _latest_is(folder: Path, name: str):
    link = folder / "latest-rank0.pt"
    return lambda: link.is_symlink() and os.readlink(link) == name


def _assert_same_training(reference: Path, resumed: Path, final_ckpt: str, *, rank: int = 0) -> None:
    ref_trace, res_trace = effective_trace(reference / "run", rank), effective_trace(resumed / "run", rank)
    assert sorted(res_trace) == list(range(MAX_BATCHES)), f"batches traced: {sorted(res_trace)}"
    for b in range(MAX_BATCHES):
        assert res_trace[b]["sample_idx"] == ref_trace[b]["sample_idx"], \
            f"batch {b}: samples {res_trace[b]['sample_idx']} != uninterrupted {ref_trace[b]['sample_idx']}"
        assert res_trace[b]["doc_ids"] == ref_trace[b]["doc_ids"], f"batch {b}: document ids differ"
    samples = [s for b in range(MAX_BATCHES) for s in res_trace[b]["sample_idx"]]
    assert len(samples) == len(set(samples)), "a sample was trained twice within the epoch"

    ref = load_checkpoint(reference / "ckpt" / final_ckpt)
    res = load_checkpoint(resumed / "ckpt" / final_ckpt)
    assert ref["state"]["timestamp"]["Timestamp"]["batch"] == res["state"]["timestamp"]["Timestamp"]["batch"] == MAX_BATCHES
    model_diff = tensor_differences(ref["state"]["model"], res["state"]["model"], "model")
    assert not model_diff, f"weights differ from the uninterrupted run: {model_diff[:5]}"
    optim_diff = tensor_differences(ref["state"]["optimizers"], res["state"]["optimizers"], "optimizers")
    assert not optim_diff, f"optimizer state differs: {optim_diff[:5]}"
    data_diff = tensor_differences(ref["state"]["callbacks"]["DataResumption"],
                                   res["state"]["callbacks"]["DataResumption"], "data")
    assert not data_diff, data_diff


@pytest.mark.timeout(300)
def test_fresh_starts_draw_the_same_initial_weights(tmp_path, demo_data):
    states = []
    for name in ("a", "b"):
        work = tmp_path / name
        result = run_train(demo_data, work, "max_duration=1ba", f"checkpoint.save_folder={work}/ckpt",
                           "checkpoint.save_interval=1ba")
        assert result.returncode == 0, result.tail()
        states.append(load_checkpoint(work / "ckpt/ep0-ba1-rank0.pt")["state"]["model"])
    diff = tensor_differences(states[0], states[1], "model")
    assert not diff, f"two fresh starts with seed 17 differ: {diff[:3]}"


def test_sigkill_at_four_points_then_resume_is_bitwise_exact(tmp_path, demo_data):
    reference, resumed = tmp_path / "uninterrupted", tmp_path / "killed"
    base = run_train(demo_data, reference, *_common(reference))
    assert base.returncode == 0, base.tail()
    assert trained_batches(reference / "run") == list(range(MAX_BATCHES))

    run_dir, ckpt = resumed / "run", resumed / "ckpt"
    kill_points = [
        ("batch 3, before any checkpoint (restart from scratch)", lambda: traced_batch_seen(run_dir, 3)),
        ("right after the batch-8 checkpoint", lambda: _latest_is(ckpt, "ep0-ba8-rank0.pt")),
        ("batch 13, mid-interval", lambda: traced_batch_seen(run_dir, 13)),
        ("batch 17, just past the batch-16 checkpoint", lambda: traced_batch_seen(run_dir, 17)),
    ]
    for what, condition in kill_points:
        launch = start_train(demo_data, resumed, *_common(resumed))
        wait_until(launch, condition(), what=what)
        launch.sigkill()
    last = start_train(demo_data, resumed, *_common(resumed)).wait()
    assert last.returncode == 0, last.tail()
    assert "Autoresuming training from checkpoint" in last.output
    # Each launch resumed where the previous one's last checkpoint left off: the trained batches are
    # 0..3 | 0..8 | 8..13 | 8..17 | 16..23 (a killed batch may or may not have logged its loss).
    assert trained_batches(run_dir)[-8:] == list(range(16, 24)), trained_batches(run_dir)
    _assert_same_training(reference, resumed, f"ep0-ba{MAX_BATCHES}-rank0.pt")


def test_two_processes_sigkill_one_rank_then_resume_is_bitwise_exact(tmp_path, demo_data):
    """`composer -n 2`: SIGKILL rank 1 mid-interval; the launcher stops rank 0; the same command
    resumes both ranks bitwise exactly, each rank's data identical to the uninterrupted run."""
    import psutil

    from tests.s3_server import free_port

    def launcher() -> list[str]:
        return [sys.executable, "-m", "composer.cli.launcher", "-n", "2", "--master_port", str(free_port())]

    reference, resumed = tmp_path / "uninterrupted", tmp_path / "killed"
    overrides = (*_common(reference), "data.num_workers=0")
    base = run_train(demo_data, reference, *overrides, launcher=launcher())
    assert base.returncode == 0, base.tail()

    overrides = (*_common(resumed), "data.num_workers=0")
    first = Launch(train_command(demo_data, resumed, *overrides, launcher=launcher()), resumed, None)
    wait_until(first, traced_batch_seen(resumed / "run", 11, rank=1), what="rank 1 at batch 11")
    ranks = [p for p in psutil.Process(first.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
    rank1 = [p for p in ranks if p.environ().get("RANK") == "1"]
    assert len(rank1) == 1, [p.cmdline() for p in ranks]
    rank1[0].kill()
    ended = first.wait(120)
    assert ended.returncode != 0, "the launcher must fail when a rank dies"

    last = Launch(train_command(demo_data, resumed, *overrides, launcher=launcher()), resumed, None).wait()
    assert last.returncode == 0, last.tail()
    for rank in (0, 1):
        _assert_same_training(reference, resumed, f"ep0-ba{MAX_BATCHES}-rank0.pt", rank=rank)
