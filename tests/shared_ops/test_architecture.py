"""Weights that record the network settings they were trained with (``shared_ops.architecture``), and the
checked loader's message for a checkpoint of another network."""

from __future__ import annotations

import io

import pytest
import torch
from ignite.engine import Engine

from roigan_stain_transfer.networks import ResnetGenerator
from rrn_lung_registration.networks import RRN, VoxelMorphBaseline
from shared_ops.architecture import ArchitectureMismatchError, decode_architecture
from shared_ops.checkpoints import CheckedCheckpointLoader, CheckpointError

NARROW = {"pyramid_channels": [8, 8, 16, 16], "estimator_channels": [16, 16, 16, 16, 8]}


def _reloaded(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dicts_record_the_settings_as_a_tensor():
    state = ResnetGenerator(base_channels=4, num_blocks=1, upsampling="resize").state_dict()
    assert all(isinstance(value, torch.Tensor) for value in state.values())  # tools expecting tensors keep working
    record = decode_architecture(_reloaded(state)["_extra_state"])
    assert record == {
        "class": "ResnetGenerator",
        "settings": {"base_channels": 4, "in_channels": 3, "num_blocks": 1, "out_channels": 3, "upsampling": "resize"},
    }
    rrn = decode_architecture(RRN(**NARROW).state_dict()["_extra_state"])["settings"]
    assert rrn["pyramid_channels"] == [8, 8, 16, 16] and rrn["normalize"] == "channel" and "field_init_std" not in rrn


def test_same_settings_load_other_settings_name_both_values():
    state = _reloaded(RRN(**NARROW).state_dict())
    RRN(**NARROW).load_state_dict(state)
    # a setting that changes no weight shape is caught too: the weights would load and compute something else
    with pytest.raises(ArchitectureMismatchError) as caught:
        RRN(**NARROW, normalize="global").load_state_dict(state)
    assert str(caught.value) == (
        "the weights were trained with other RRN settings than this configuration builds: "
        'normalize: checkpoint "channel", configuration "global".'
    )
    assert caught.value.differences == {"normalize": ("channel", "global")}
    other = {**state, "_extra_state": VoxelMorphBaseline().state_dict()["_extra_state"]}
    with pytest.raises(ArchitectureMismatchError, match="the weights are those of a VoxelMorphBaseline, the network"):
        RRN(**NARROW).load_state_dict(other)


def test_weights_saved_before_the_record_load_unchecked():
    state = ResnetGenerator(base_channels=4, num_blocks=1).state_dict()
    del state["_extra_state"]
    ResnetGenerator(base_channels=4, num_blocks=1).load_state_dict(state)


def test_networks_still_export_to_torchscript():
    generator = ResnetGenerator(base_channels=4, num_blocks=1).eval()
    scripted = torch.jit.script(generator)
    tiles = torch.rand(1, 3, 16, 24) * 2 - 1
    assert torch.allclose(scripted(tiles), generator(tiles))


def test_checked_loader_names_the_file_both_values_and_the_overrides(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(ResnetGenerator(base_channels=4, num_blocks=1).state_dict(), path)
    keys = {"base_channels": "generator_channels", "num_blocks": "generator_blocks", "upsampling": "upsampling"}
    loader = CheckedCheckpointLoader(
        path, {"g_xy": ResnetGenerator(base_channels=8, num_blocks=1)}, map_location="cpu", config_keys=keys
    )
    with pytest.raises(CheckpointError) as caught:
        loader.attach(Engine(lambda engine, batch: None))
    assert str(caught.value) == (
        f"{path}: 'g_xy': the weights were trained with other ResnetGenerator settings than this configuration "
        "builds: base_channels: checkpoint 4, configuration 8. To use this checkpoint, run with: "
        "--generator_channels 4."
    )
    prefixed = CheckedCheckpointLoader(
        path, {"network": ResnetGenerator(base_channels=4, num_blocks=2)}, config_keys="network_def::"
    )
    with pytest.raises(CheckpointError, match="run with: --network_def#num_blocks 1.$"):
        prefixed.attach(Engine(lambda engine, batch: None))
