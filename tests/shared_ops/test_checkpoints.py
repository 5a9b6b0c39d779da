"""Atomic checkpoints and finding the one to resume from."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from shared_ops.checkpoints import AtomicCheckpointSaver, latest_checkpoint


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
