"""Atomic checkpoints, finding the one to resume from, and the settings a run records in them."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from shared_ops.checkpoints import AtomicCheckpointSaver, RunSettings, RunSettingsError, latest_checkpoint


def test_latest_checkpoint_takes_the_highest_complete_step(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    torch.save({"a": torch.zeros(1)}, tmp_path / "checkpoint_iteration=10.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "checkpoint_iteration=9.pt")
    (tmp_path / "model.pt").write_bytes(b"not a step checkpoint")
    assert latest_checkpoint(tmp_path).endswith("=10.pt")
    data = (tmp_path / "checkpoint_iteration=10.pt").read_bytes()
    (tmp_path / "checkpoint_iteration=20.pt").write_bytes(data[: len(data) // 2])  # written in place, then killed
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        assert latest_checkpoint(tmp_path).endswith("=10.pt")


def test_a_save_that_fails_half_way_leaves_the_previous_checkpoint_alone(tmp_path, monkeypatch):
    weights = torch.nn.Linear(3, 2)
    engine = Engine(lambda engine, batch: None)
    # n_saved=2: ignite removes the oldest file before writing the next one, so one complete file always stays
    AtomicCheckpointSaver(str(tmp_path), {"net": weights}, save_interval=1, epoch_level=False, n_saved=2).attach(engine)
    engine.run([0], max_epochs=1)
    first = tmp_path / "net_iteration=1.pt"
    assert first.is_file()

    real_save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise KeyboardInterrupt  # the process dies after writing, before the rename

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        engine.run([0], max_epochs=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["net_iteration=1.pt"]
    torch.load(first, weights_only=True)


def test_interval_checkpoints_of_an_earlier_run_count_towards_n_saved(tmp_path):
    weights = torch.nn.Linear(3, 2)
    first = Engine(lambda engine, batch: None)
    AtomicCheckpointSaver(str(tmp_path), {"net": weights}, save_interval=1, epoch_level=False, n_saved=2).attach(first)
    first.run([0], max_epochs=2)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["net_iteration=1.pt", "net_iteration=2.pt"]

    resumed = Engine(lambda engine, batch: None)  # a new process: a new saver that did not write those files
    resumed.load_state_dict({"iteration": 2, "epoch_length": 1, "max_epochs": 2})
    AtomicCheckpointSaver(str(tmp_path), {"net": weights}, save_interval=1, epoch_level=False, n_saved=2).attach(
        resumed
    )
    resumed.run([0], max_epochs=4)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["net_iteration=3.pt", "net_iteration=4.pt"]


def test_a_failed_run_writes_no_final_checkpoint(tmp_path):
    def fail(engine, batch):
        raise ValueError("broken batch")

    engine = Engine(fail)
    saver = AtomicCheckpointSaver(str(tmp_path), {"net": torch.nn.Linear(3, 2)}, save_final=True, final_filename="m.pt")
    saver.attach(engine)
    with pytest.raises(ValueError, match="broken batch"):
        engine.run([0], max_epochs=1)
    assert not (tmp_path / "m.pt").exists()


def test_run_settings_name_each_difference_and_how_to_start_anew(tmp_path):
    recorded = RunSettings({"lambda_cyc": 30.0, "betas": (0.5, 0.999), "net": torch.nn.LeakyReLU(0.2)}).state_dict()
    same = RunSettings({"lambda_cyc": 30, "betas": [0.5, 0.999], "net": torch.nn.LeakyReLU(0.2)})
    same.check(recorded, tmp_path / "checkpoint_iteration=9.pt")  # 30 and 30.0, tuples and lists: the same
    other = RunSettings({"lambda_cyc": 10, "betas": [0.5, 0.999], "net": torch.nn.LeakyReLU(0.1), "seed": 1})
    assert other.differences(recorded) == [
        "lambda_cyc: 30.0 -> 10",
        "net: LeakyReLU(inplace=False, negative_slope=0.2) -> LeakyReLU(inplace=False, negative_slope=0.1)",
        "seed: (absent) -> 1",
    ]
    with pytest.raises(RunSettingsError, match=r"checkpoint_iteration=9.pt: cannot resume.*lambda_cyc: 30.0 -> 10"):
        other.check(recorded, tmp_path / "checkpoint_iteration=9.pt")
    with pytest.raises(RunSettingsError, match="records no run settings"):
        other.check(None, tmp_path / "checkpoint_iteration=9.pt")
    with pytest.raises(TypeError, match="'device' is a device"):
        RunSettings({"device": torch.device("cpu")})
