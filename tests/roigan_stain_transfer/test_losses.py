"""Tests of the region-guided CycleGAN losses and the replay buffer."""

from __future__ import annotations

import io

import pytest
import torch

from roigan_stain_transfer.losses import (
    ReplayBuffer,
    cycle_loss,
    identity_loss,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    lsgan_loss,
)

# ------------------------------------------------------------------------------------------------------------
# Loss values computed by hand
# ------------------------------------------------------------------------------------------------------------


def test_lsgan_hand_computed():
    prediction = torch.tensor([0.5, 1.5, -1.0])
    # real: (0.25 + 0.25 + 4) / 3; fake: (0.25 + 2.25 + 1) / 3
    assert float(lsgan_loss(prediction, real=True)) == pytest.approx(1.5)
    assert float(lsgan_loss(prediction, real=False)) == pytest.approx(3.5 / 3)
    assert float(lsgan_generator_loss(prediction)) == pytest.approx(1.5)
    real, fake = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    # 0.5 * ((0 + 1) / 2 + (0 + 4) / 2)
    assert float(lsgan_discriminator_loss(real, fake)) == pytest.approx(1.25)


def test_lsgan_any_shape_and_gradient():
    patch = torch.full((2, 1, 8, 8), 0.25, requires_grad=True)
    loss = lsgan_loss(patch, real=True)
    assert float(loss.detach()) == pytest.approx(0.5625)
    loss.backward()
    torch.testing.assert_close(patch.grad, torch.full_like(patch, 2 * (0.25 - 1) / patch.numel()))


def test_lsgan_empty_prediction_is_zero_and_differentiable():
    logits = torch.zeros(0, requires_grad=True)
    loss = lsgan_discriminator_loss(logits, logits * 2)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    with pytest.raises(TypeError):
        lsgan_loss(torch.tensor([1, 0]), real=True)


def test_cycle_and_identity_l1_hand_computed():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    b = torch.tensor([[[[0.0, 2.0], [5.0, 4.0]]]])
    assert float(cycle_loss(a, b)) == pytest.approx(0.75)
    assert float(identity_loss(b, a)) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shapes differ"):
        cycle_loss(a, b[..., :1])


# ------------------------------------------------------------------------------------------------------------
# Replay buffer
# ------------------------------------------------------------------------------------------------------------


def _tiles(ids: list[int]) -> torch.Tensor:
    """Tiles (B, 3, 4, 4) whose every pixel holds their id."""
    return torch.tensor(ids, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()


def _ids(tiles: torch.Tensor) -> list[int]:
    return [int(t[0, 0, 0]) for t in tiles]


def _stored_ids(buffer: ReplayBuffer) -> list[int]:
    images = buffer.state_dict()["images"]
    return _ids(images) if images.numel() else []


def test_replay_buffer_returns_incoming_until_full():
    buffer = ReplayBuffer(capacity=5, seed=0)
    assert _ids(buffer.query(_tiles([0, 1, 2]))) == [0, 1, 2]
    assert _ids(buffer.query(_tiles([3, 4]))) == [3, 4]
    assert len(buffer) == 5 and _stored_ids(buffer) == [0, 1, 2, 3, 4]


def test_replay_buffer_swaps_half_of_the_time_once_full():
    buffer = ReplayBuffer(capacity=4, seed=1)
    buffer.query(_tiles([0, 1, 2, 3]))
    swaps = 0
    for new_id in range(4, 404):
        before = _stored_ids(buffer)
        (returned,) = _ids(buffer.query(_tiles([new_id])))
        after = _stored_ids(buffer)
        if returned == new_id:  # incoming returned, pool unchanged
            assert after == before
        else:  # a stored tile returned and replaced in its slot by the incoming one
            swaps += 1
            slot = before.index(returned)
            assert after == before[:slot] + [new_id] + before[slot + 1 :]
    assert 160 <= swaps <= 240  # Binomial(400, 0.5): mean 200, sd 10
    assert len(buffer) == 4


def test_replay_buffer_detaches_and_checks_shapes():
    buffer = ReplayBuffer(capacity=2, seed=0)
    fake = _tiles([1, 2]).requires_grad_()
    assert not buffer.query(fake * 2).requires_grad
    with pytest.raises(ValueError, match="do not match"):
        buffer.query(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        buffer.query(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity=-1)


def test_replay_buffer_capacity_zero_passes_through():
    buffer = ReplayBuffer(capacity=0)
    assert _ids(buffer.query(_tiles([7, 8]))) == [7, 8] and len(buffer) == 0


def test_replay_buffer_state_round_trip_is_exact():
    original = ReplayBuffer(capacity=6, seed=3)
    for step in range(10):
        original.query(_tiles([10 * step + i for i in range(4)]))
    saved = io.BytesIO()
    torch.save(original.state_dict(), saved)
    snapshot = original.state_dict()

    restored = ReplayBuffer(capacity=6, seed=99)
    saved.seek(0)
    restored.load_state_dict(torch.load(saved, weights_only=True))
    for step in range(10, 20):
        batch = _tiles([10 * step + i for i in range(4)])
        torch.testing.assert_close(restored.query(batch), original.query(batch))
    torch.testing.assert_close(restored.state_dict()["images"], original.state_dict()["images"])
    assert torch.equal(restored.state_dict()["rng_state"], original.state_dict()["rng_state"])

    # the snapshot was a copy: later queries left it alone, and it replays the same run again
    again = ReplayBuffer(capacity=6, seed=5)
    again.load_state_dict(snapshot)
    replay = ReplayBuffer(capacity=6, seed=6)
    replay.load_state_dict(snapshot)
    for step in range(10, 20):
        batch = _tiles([10 * step + i for i in range(4)])
        torch.testing.assert_close(again.query(batch), replay.query(batch))


def test_replay_buffer_empty_state_and_capacity_mismatch():
    empty = ReplayBuffer(capacity=3, seed=0).state_dict()
    buffer = ReplayBuffer(capacity=3, seed=1)
    buffer.load_state_dict(empty)
    assert len(buffer) == 0
    with pytest.raises(ValueError, match="capacity 3"):
        ReplayBuffer(capacity=4).load_state_dict(empty)
    with pytest.raises(KeyError, match="rng_state"):
        buffer.load_state_dict({"capacity": 3, "images": torch.zeros(0)})


def test_replay_buffer_default_seed_follows_torch_manual_seed():
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        buffer = ReplayBuffer(capacity=2)
        runs.append([_ids(buffer.query(_tiles([i, i + 100]))) for i in range(20)])
    assert runs[0] == runs[1]
