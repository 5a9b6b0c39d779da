"""Tests of the region-guided CycleGAN networks: shapes, parameter counts, gradients, input checks, class map."""

from __future__ import annotations

import pytest
import torch

from roigan_stain_transfer.networks import (
    PatchDiscriminator,
    ResnetGenerator,
    RoIDiscriminator,
    as_rois,
    count_parameters,
    init_weights,
    paint_class_map,
)
from shared_ops import RoIAlign

# ------------------------------------------------------------------------------------------------------------
# Parameter counts (released numbers, to 0.01 M, and the exact counts of this implementation)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("upsampling", ["transposed", "resize"])
@pytest.mark.parametrize(("blocks", "millions", "exact"), [(6, 7.84, 7_837_699), (9, 11.38, 11_378_179)])
def test_generator_parameter_count(upsampling, blocks, millions, exact):
    count = count_parameters(ResnetGenerator(num_blocks=blocks, upsampling=upsampling, init_std=None))
    assert round(count / 1e6, 2) == millions
    assert count == exact


@pytest.mark.parametrize("stride_one_layers", [0, 1, 2])
def test_patch_discriminator_parameter_count(stride_one_layers):
    count = count_parameters(PatchDiscriminator(stride_one_layers=stride_one_layers, init_std=None))
    assert round(count / 1e6, 2) == 6.96
    assert count == 6_959_553


@pytest.mark.parametrize(("in_channels", "exact"), [(5, 2_764_033), (3, 2_761_985)])
def test_roi_discriminator_parameter_count(in_channels, exact):
    count = count_parameters(RoIDiscriminator(in_channels=in_channels, init_std=None))
    assert round(count / 1e6, 2) == 2.76
    assert count == exact


# ------------------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------------------


def test_generator_shape_and_range_on_256_tile():
    generator = ResnetGenerator(num_blocks=6, upsampling="resize").eval()
    with torch.no_grad():
        out = generator(torch.rand(1, 3, 256, 256) * 2 - 1)
    assert out.shape == (1, 3, 256, 256)
    assert out.abs().max() <= 1


@pytest.mark.parametrize("upsampling", ["transposed", "resize"])
def test_generator_shape_non_square(upsampling):
    generator = ResnetGenerator(num_blocks=1, upsampling=upsampling, in_channels=4, out_channels=3)
    with torch.no_grad():
        assert generator(torch.randn(2, 4, 32, 48)).shape == (2, 3, 32, 48)


@pytest.mark.parametrize(("stride_one_layers", "size"), [(0, 8), (1, 16), (2, 32)])
def test_patch_discriminator_output_sizes_on_256(stride_one_layers, size):
    discriminator = PatchDiscriminator(stride_one_layers=stride_one_layers)
    assert discriminator.output_size(256) == (size, size)
    with torch.no_grad():
        assert discriminator(torch.randn(1, 3, 256, 256)).shape == (1, 1, size, size)


@pytest.mark.parametrize(("size", "stride_one_layers"), [(8, 0), (16, 1), (32, 2)])
def test_patch_discriminator_for_output_size(size, stride_one_layers):
    assert PatchDiscriminator.for_output_size(size, init_std=None).stride_one_layers == stride_one_layers


def test_patch_discriminator_same_parameter_names_in_every_variant():
    names = [list(PatchDiscriminator(stride_one_layers=s, init_std=None).state_dict()) for s in (0, 1, 2)]
    assert names[0] == names[1] == names[2]


def test_roi_discriminator_uses_shared_roi_align():
    align = RoIDiscriminator().roi_align
    assert isinstance(align, RoIAlign)
    assert (align.output_size, align.spatial_scale, align.sampling_ratio, align.aligned) == ((3, 3), 1 / 16, -1, False)


def _library_boxes() -> list[torch.Tensor]:
    """Per-tile 48 x 48 boxes of a batch of two 128 x 128 tiles: 3 boxes on tile 0, 2 on tile 1."""
    return [
        torch.tensor([[0, 0, 48, 48], [60, 40, 108, 88], [80, 80, 128, 128]]),
        torch.tensor([[10, 20, 58, 68], [70, 60, 118, 108]]),
    ]


@pytest.mark.parametrize("in_channels", [3, 5])
def test_roi_discriminator_one_logit_per_box(in_channels):
    discriminator = RoIDiscriminator(in_channels=in_channels)
    images = torch.randn(2, 3, 128, 128)
    boxes = _library_boxes()
    classes = [torch.tensor([0, 1, 1]), torch.tensor([1, 0])]
    with torch.no_grad():
        from_list = discriminator(images, boxes, classes)
        rows = torch.cat([torch.cat([torch.full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)])
        from_rows = discriminator(images, rows, torch.cat(classes))
        none = discriminator(images, torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    assert from_list.shape == (5,)
    torch.testing.assert_close(from_list, from_rows)
    assert none.shape == (0,)


def test_roi_discriminator_paints_the_class_map_itself():
    discriminator = RoIDiscriminator(in_channels=5).eval()
    images = torch.randn(2, 3, 128, 128)
    boxes, classes = _library_boxes(), [torch.tensor([0, 1, 1]), torch.tensor([1, 0])]
    class_map = paint_class_map(boxes, classes, 2, 128, 128)
    with torch.no_grad():
        painted = discriminator(images, boxes, classes)
        given = discriminator(torch.cat([images, class_map], 1), boxes)
        other_classes = discriminator(images, boxes, [torch.tensor([1, 1, 1]), torch.tensor([1, 1])])
    torch.testing.assert_close(painted, given)
    assert not torch.allclose(painted, other_classes)


# ------------------------------------------------------------------------------------------------------------
# Gradients and initialisation
# ------------------------------------------------------------------------------------------------------------


def _assert_gradients_everywhere(network: torch.nn.Module, output: torch.Tensor) -> None:
    (output * torch.randn_like(output)).sum().backward()
    for name, parameter in network.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        if parameter.ndim > 1:  # biases just before a non-affine InstanceNorm get an exactly zero gradient
            assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("upsampling", ["transposed", "resize"])
def test_generator_gradients_reach_every_parameter(upsampling):
    generator = ResnetGenerator(num_blocks=6, upsampling=upsampling)
    _assert_gradients_everywhere(generator, generator(torch.randn(1, 3, 16, 16)))


@pytest.mark.parametrize("stride_one_layers", [0, 2])
def test_patch_discriminator_gradients_reach_every_parameter(stride_one_layers):
    discriminator = PatchDiscriminator(stride_one_layers=stride_one_layers)
    size = 64 if stride_one_layers == 0 else 16
    _assert_gradients_everywhere(discriminator, discriminator(torch.randn(1, 3, size, size)))


def test_roi_discriminator_gradients_reach_every_parameter_and_input():
    discriminator = RoIDiscriminator(in_channels=5)
    images = torch.randn(2, 3, 64, 64, requires_grad=True)
    boxes = torch.tensor([[0, 0, 0, 48, 48], [1, 16, 8, 64, 56], [1, 3, 5, 30, 40]], dtype=torch.float32)
    logits = discriminator(images, boxes, torch.tensor([1, 0, 1]))
    assert logits.shape == (3,)
    _assert_gradients_everywhere(discriminator, logits)
    assert images.grad is not None and images.grad.abs().sum() > 0


@torch.no_grad()
def test_init_weights_normal_002():
    generator = ResnetGenerator(num_blocks=1)
    conv = generator.blocks[0].body[1]
    assert abs(float(conv.weight.std()) - 0.02) < 0.001 and abs(float(conv.weight.mean())) < 0.001
    assert float(conv.bias.abs().max()) == 0.0
    roi = init_weights(RoIDiscriminator(init_std=None), std=0.02)
    norm = roi.features[1][1]
    assert isinstance(norm, torch.nn.BatchNorm2d)
    assert abs(float(norm.weight.mean()) - 1.0) < 0.01 and float(norm.bias.abs().max()) == 0.0
    with pytest.raises(ValueError, match="std"):
        init_weights(roi, std=0.0)


# ------------------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------------------


def test_generator_rejects_bad_input():
    generator = ResnetGenerator(num_blocks=1)
    with pytest.raises(ValueError, match="expected 3 channels"):
        generator(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        generator(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="4-D"):
        generator(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        generator(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_scripted_generator_rejects_bad_shapes_too():
    """ckpt_export scripts the generator: the shape checks hold in TorchScript (a 30 x 34 tile would otherwise come
    back as 32 x 36)."""
    scripted = torch.jit.script(ResnetGenerator(num_blocks=1, base_channels=4).eval())
    assert scripted(torch.zeros(1, 3, 32, 36)).shape == (1, 3, 32, 36)
    for shape, message in (
        ((1, 3, 30, 34), "ResnetGenerator input: tile height and width must be positive multiples of 4, got 30 x 34"),
        ((1, 4, 32, 32), "ResnetGenerator input: expected 3 channels"),
        ((3, 32, 32), "ResnetGenerator input: expected a 4-D tensor"),
    ):
        with pytest.raises(torch.jit.Error, match=message):
            scripted(torch.zeros(shape))


def test_constructors_reject_bad_arguments():
    with pytest.raises(ValueError, match="upsampling"):
        ResnetGenerator(upsampling="bilinear")
    with pytest.raises(ValueError, match="num_blocks"):
        ResnetGenerator(num_blocks=-1)
    with pytest.raises(ValueError, match="stride_one_layers"):
        PatchDiscriminator(stride_one_layers=6)
    with pytest.raises(ValueError, match="output size 12"):
        PatchDiscriminator.for_output_size(12)
    with pytest.raises(ValueError, match="in_channels"):
        RoIDiscriminator(in_channels=4)


def test_patch_discriminator_rejects_bad_input():
    with pytest.raises(ValueError, match="multiples of 32"):
        PatchDiscriminator()(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match="multiples of 8"):
        PatchDiscriminator(stride_one_layers=2)(torch.randn(1, 3, 20, 20))
    with pytest.raises(ValueError, match="expected 3 channels"):
        PatchDiscriminator()(torch.randn(1, 1, 64, 64))


def test_roi_discriminator_rejects_bad_input():
    discriminator = RoIDiscriminator(in_channels=5)
    images = torch.randn(2, 3, 64, 64)
    good = torch.tensor([[0, 0, 0, 48, 48.0]])
    with pytest.raises(ValueError, match="without box classes"):
        discriminator(images, good)
    with pytest.raises(ValueError, match="expected 5 channels"):
        discriminator(torch.randn(2, 4, 64, 64), good)
    with pytest.raises(ValueError, match="multiples of 16"):
        RoIDiscriminator()(torch.randn(2, 3, 40, 64), good)
    with pytest.raises(ValueError, match="1 classes for 2 boxes"):
        discriminator(images, torch.tensor([[0, 0, 0, 48, 48.0], [1, 0, 0, 48, 48]]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"labels in \[0, 2\)"):
        discriminator(images, good, torch.tensor([2]))


@pytest.mark.parametrize(
    ("boxes", "message"),
    [
        (torch.tensor([[0, 0, 48, 48.0]]), r"Tensor\[K, 5\]"),
        (torch.tensor([[0, 10, 0, 10, 48.0]]), "x2 > x1"),
        (torch.tensor([[0, 0, 30, 48, 20.0]]), "y2 > y1"),
        (torch.tensor([[0, 20, 20, 68, 68.0]]), "outside"),
        (torch.tensor([[0, -1, 0, 47, 48.0]]), "outside"),
        (torch.tensor([[2, 0, 0, 48, 48.0]]), "batch index"),
        (torch.tensor([[0.5, 0, 0, 48, 48.0]]), "batch index"),
        (torch.tensor([[0, 0, 0, float("nan"), 48.0]]), "finite"),
        ([torch.tensor([[0, 0, 48, 48]])], "1 per-tile box tensors for a batch of 2"),
        ([torch.zeros(1, 5), torch.zeros(0, 4)], r"boxes\[0\]"),
        (torch.zeros(5).tolist(), "5 per-tile box tensors"),
        ("boxes", "expected a Tensor"),
    ],
)
def test_malformed_boxes_are_rejected(boxes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        RoIDiscriminator()(torch.randn(2, 3, 64, 64), boxes)


# ------------------------------------------------------------------------------------------------------------
# Class map
# ------------------------------------------------------------------------------------------------------------


def test_paint_class_map_hand_built():
    boxes = torch.tensor(
        [
            [0, 2, 3, 14, 15],  # tile 0, cancer: columns 7..8, rows 8..9 after shrinking by 5
            [1, 0, 0, 20, 20],  # tile 1, normal: rows and columns 5..14
            [1, 10, 10, 19, 19],  # tile 1, cancer, 9 px wide: nothing left after shrinking
            [0, 4, 3, 16, 15],  # tile 0, cancer, overlapping the first: columns 9..10, rows 8..9
        ]
    )
    classes = torch.tensor([1, 0, 1, 1])
    class_map = paint_class_map(boxes, classes, batch_size=2, height=20, width=20)
    expected = torch.zeros(2, 2, 20, 20)
    expected[0, 1, 8:10, 7:11] = 1
    expected[1, 0, 5:15, 5:15] = 1
    assert class_map.dtype == torch.float32
    torch.testing.assert_close(class_map, expected)


def test_paint_class_map_library_box_and_list_input():
    boxes = [torch.tensor([[100, 40, 148, 88]]), torch.zeros(0, 4, dtype=torch.long)]
    class_map = paint_class_map(boxes, [torch.tensor([0]), torch.zeros(0, dtype=torch.long)], 2, 256, 256)
    assert class_map.shape == (2, 2, 256, 256)
    assert class_map.sum() == 38 * 38
    assert class_map[0, 0, 45:83, 105:143].min() == 1
    unshrunk = paint_class_map(boxes, [torch.tensor([1]), torch.zeros(0)], 2, 256, 256, shrink=0)
    assert unshrunk[0, 1].sum() == 48 * 48 and unshrunk[0, 1, 40:88, 100:148].min() == 1


def test_as_rois_formats_agree():
    listed = as_rois([torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6, 7, 8], [0, 0, 9, 9]])], 2, 10, 10)
    torch.testing.assert_close(listed, torch.tensor([[0, 1, 2, 3, 4], [1, 5, 6, 7, 8], [1, 0, 0, 9, 9.0]]))
