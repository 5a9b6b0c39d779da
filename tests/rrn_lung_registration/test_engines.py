"""The registration trainer and evaluator, in process: a short training on a phantom pair lowers TRE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.handlers import CheckpointLoader

from rrn_lung_registration.losses import RegistrationLoss
from rrn_lung_registration.networks import RRN, VoxelMorphBaseline
from rrn_lung_registration.synthetic.phantom import make_breathing_pair
from rrn_lung_registration.training.engines import RegistrationEvaluator, RegistrationTrainer
from rrn_lung_registration.training.metrics import TargetRegistrationError
from shared_ops.checkpoints import AtomicCheckpointSaver, latest_checkpoint, load_network_weights

SIZE = 48


class ZeroField(torch.nn.Module):
    """No registration: the identity transform."""

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return torch.zeros(moving.shape[0], 3, *moving.shape[2:])


def _narrow_rrn() -> RRN:
    return RRN(
        pyramid_channels=(8, 16, 16, 16),
        estimator_channels=(16, 16, 16, 16, 8),
        refiner_channels=(16, 16, 16, 16, 16, 8, 3),
    )


def _as_item(pair) -> dict:
    """A phantom pair as one preprocessed datalist item: tensors (1, D, H, W) in [0, 1] with geometry."""
    affine = torch.as_tensor(np.diag([*pair.spacing, 1.0]))  # array axes are the tensor axes here

    def image(hu: np.ndarray) -> MetaTensor:
        return MetaTensor(torch.from_numpy(np.clip((hu + 1000.0) / 900.0, 0, 1)).float()[None], affine=affine)

    return {
        "fixed": image(pair.fixed),
        "moving": image(pair.moving),
        "fixed_landmarks": torch.from_numpy(pair.fixed_landmarks).float(),
        "moving_landmarks": torch.from_numpy(pair.moving_landmarks).float(),
    }


@pytest.fixture(scope="module")
def phantom_item() -> dict:
    return _as_item(make_breathing_pair((SIZE, SIZE, SIZE), seed=3))


def _evaluate(network, item) -> float:
    metric = TargetRegistrationError()
    evaluator = RegistrationEvaluator(
        "cpu", DataLoader(Dataset([item]), batch_size=1), network, key_val_metric={"tre": metric}
    )
    evaluator.run()
    return evaluator.state.metrics["tre"], metric


def test_evaluator_output_carries_the_fixed_geometry(phantom_item):
    evaluator = RegistrationEvaluator("cpu", DataLoader(Dataset([phantom_item]), batch_size=1), _narrow_rrn())
    evaluator.run()
    (output,) = evaluator.state.output
    assert output["pred"].shape == (3, SIZE, SIZE, SIZE) and output["warped"].shape == (1, SIZE, SIZE, SIZE)
    torch.testing.assert_close(output["warped"].affine, phantom_item["fixed"].affine)
    assert output["fixed_landmarks"].shape == (300, 3)


def test_tre_of_a_zero_field_is_the_ground_truth_before_registration(phantom_item):
    tre, metric = _evaluate(ZeroField(), phantom_item)
    truth = np.linalg.norm(
        (phantom_item["fixed_landmarks"] - phantom_item["moving_landmarks"]).numpy() * (300 / SIZE), axis=1
    )
    assert tre == pytest.approx(truth.mean(), rel=1e-5)
    assert metric.records[0]["before"]["mean"] == pytest.approx(truth.mean(), rel=1e-5)


@pytest.mark.slow
def test_short_training_lowers_tre_and_resumes_from_its_checkpoint(phantom_item, tmp_path):
    torch.manual_seed(0)
    network = _narrow_rrn()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    loader = DataLoader(Dataset([phantom_item]), batch_size=1)
    trainer = RegistrationTrainer(
        "cpu", max_epochs=20, train_data_loader=loader, network=network, optimizer=optimizer,
        loss_function=RegistrationLoss(),
    )  # fmt: skip
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    saver = AtomicCheckpointSaver(
        str(tmp_path),
        {"network": network, "optimizer": optimizer, "trainer": trainer},
        save_interval=5,
        epoch_level=False,
    )
    saver.attach(trainer)
    tre_before, _ = _evaluate(ZeroField(), phantom_item)
    trainer.run()
    tre_after, _ = _evaluate(network, phantom_item)
    assert tre_after < 0.6 * tre_before, (tre_before, tre_after)
    unchanged = [name for name, p in network.named_parameters() if torch.equal(p, before[name])]
    assert not unchanged, f"parameters never updated: {unchanged}"

    # resume into fresh objects from the latest checkpoint: same weights, same iteration
    path = latest_checkpoint(tmp_path)
    assert path is not None and path.endswith("checkpoint_iteration=20.pt")
    fresh = _narrow_rrn()
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    fresh_trainer = RegistrationTrainer(
        "cpu", max_epochs=21, train_data_loader=loader, network=fresh, optimizer=fresh_optimizer,
        loss_function=RegistrationLoss(),
    )  # fmt: skip
    CheckpointLoader(path, {"network": fresh, "optimizer": fresh_optimizer, "trainer": fresh_trainer}).attach(
        fresh_trainer
    )
    fresh_trainer.run()
    assert fresh_trainer.state.iteration == 21


def test_voxelmorph_baseline_shares_the_interface():
    network = VoxelMorphBaseline()
    moving, fixed = torch.rand(1, 1, 19, 22, 17), torch.rand(1, 1, 19, 22, 17)
    ddf = network(moving, fixed)
    assert ddf.shape == (1, 3, 19, 22, 17)
    assert sum(p.numel() for p in network.parameters()) == 244_323
    with pytest.raises(ValueError, match="same shape"):
        network(moving, torch.rand(1, 1, 19, 22, 18))


def test_load_network_weights_reads_bundle_checkpoints(tmp_path):
    network = _narrow_rrn()
    torch.save({"network": network.state_dict(), "optimizer": {}}, tmp_path / "full.pt")
    torch.save(network.state_dict(), tmp_path / "weights.pt")
    for name in ("full.pt", "weights.pt"):
        loaded = load_network_weights(_narrow_rrn(), tmp_path / name)
        for a, b in zip(loaded.state_dict().values(), network.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="weights.pt: weights do not fit RRN"):
        load_network_weights(RRN(), tmp_path / "weights.pt")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_network_weights(network, tmp_path / "absent.pt")
