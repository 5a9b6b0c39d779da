"""CT reading and writing: DICOM series, NIfTI, MHA, NRRD, DIR-Lab raw files."""

from __future__ import annotations

import shutil
import warnings

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import ITKReader, MetaTensor
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, LoadImaged, Orientation

from rrn_lung_registration.io.ct_io import (
    DIRLAB_GEOMETRY,
    DirLabReader,
    dirlab_affine,
    dirlab_geometry,
    read_ct,
    write_image,
)
from tests.conftest import require_data

POPI = "ct/popi_phase00_dicom"
POPI_SERIES_TAIL = b"9340232343065233071751154963607534694"  # end of the series UID in every POPI slice


def _oblique_affine() -> np.ndarray:
    """Voxel-to-RAS affine of a rotated grid (orthonormal directions, anisotropic spacing, a flip)."""
    a, b, c = 0.3, -0.2, 0.1
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag([-0.8, 0.9, 2.0])
    affine[:3, 3] = [120.0, -40.5, 300.0]
    return affine


OBLIQUE = _oblique_affine()


def _write_raw(path, volume_xyz: np.ndarray) -> None:
    """A DIR-Lab style file: int16 little-endian, x fastest, then y, then z."""
    np.ascontiguousarray(volume_xyz.transpose(2, 1, 0)).astype("<i2").tofile(path)


def _peak(values: np.ndarray, low: int, high: int) -> int:
    """Most frequent integer value in ``(low, high)``."""
    inside = values[(values > low) & (values < high)].astype(np.int64)
    return int(np.bincount(inside - low).argmax()) + low


# --- POPI DICOM series ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def popi():
    return read_ct(require_data(POPI))


def test_popi_series_geometry(popi):
    assert isinstance(popi, MetaTensor)
    assert tuple(popi.shape) == (512, 512, 141)
    assert popi.dtype == torch.int16
    np.testing.assert_allclose(popi.meta["spacing"], [0.9765625, 0.9765625, 2.0])
    assert popi.meta["number_of_files"] == 141
    assert str(popi.meta["filename_or_obj"]).endswith("popi_phase00_dicom")
    # the affine is the ITK geometry (LPS) expressed in RAS
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ popi.affine.numpy()
    direction = np.asarray(popi.meta["direction"])
    np.testing.assert_allclose(lps[:3, :3], direction @ np.diag(popi.meta["spacing"]))
    np.testing.assert_allclose(lps[:3, 3], popi.meta["origin"])
    np.testing.assert_allclose(np.abs(direction), np.eye(3), atol=1e-6)  # axial slices


def test_popi_slices_lie_at_their_file_positions(popi):
    """Slice k is where its file says (ImagePositionPatient), whatever SpacingBetweenSlices claims (-2 here):
    the volume runs from the abdomen (z = -164.5 mm) up to the shoulders (z = +115.5 mm)."""
    affine = popi.affine.numpy()
    for k in (0, 70, 140):
        io = itk.GDCMImageIO.New()
        io.SetFileName(str(require_data(f"{POPI}/00-slice{140 - k:03d}.dcm")))
        io.ReadImageInformation()
        position = np.array([io.GetOrigin(axis) for axis in range(3)])
        lps = np.diag([-1.0, -1.0, 1.0]) @ (affine @ [0.0, 0.0, k, 1.0])[:3]
        np.testing.assert_allclose(lps, position, atol=1e-4, err_msg=f"slice {k}")
    assert popi.meta["direction"][2][2] == pytest.approx(1.0)


def test_popi_values_are_hounsfield_units(popi):
    # the slices store unsigned integers with intercept -1024: negative values prove the rescale was applied
    io = itk.GDCMImageIO.New()
    io.SetFileName(str(sorted(require_data(POPI).glob("*.dcm"))[0]))
    io.ReadImageInformation()
    assert io.GetRescaleIntercept() == -1024.0 and io.GetRescaleSlope() == 1.0
    values = popi.numpy()
    assert values.min() == -1024
    assert abs(_peak(values[values != -1024], -1100, -900) + 1000) < 30  # air (out-of-field padding excluded)
    assert 0 <= _peak(values, -60, 300) <= 100  # soft tissue


def _dicom_copy(tmp_path, slices, patch=False):
    """Copy POPI slices; ``patch`` changes their series UID (same length) to make a second series."""
    for index in slices:
        source = require_data(f"{POPI}/00-slice{index:03d}.dcm")
        target = tmp_path / source.name
        if patch:
            content = source.read_bytes()
            assert POPI_SERIES_TAIL in content
            target.write_bytes(content.replace(POPI_SERIES_TAIL, POPI_SERIES_TAIL[:-1] + b"5"))
        else:
            shutil.copyfile(source, target)


def test_the_largest_series_is_read(tmp_path):
    _dicom_copy(tmp_path, range(0, 3))
    _dicom_copy(tmp_path, range(10, 15), patch=True)
    with pytest.warns(UserWarning, match="2 DICOM series"):
        volume = read_ct(tmp_path)
    assert tuple(volume.shape) == (512, 512, 5)
    np.testing.assert_allclose(volume.meta["spacing"], [0.9765625, 0.9765625, 2.0])
    assert volume.meta["series_uid"].startswith("1.2.826.0.1.3680043.2.1143.9340232343065233071751154963607534695")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asking for a series, or giving one file, warns about nothing
        other = read_ct(tmp_path, series_uid="1.2.826.0.1.3680043.2.1143.9340232343065233071751154963607534694")
        single = read_ct(tmp_path / "00-slice001.dcm")  # one file: the series it belongs to
    assert tuple(other.shape) == (512, 512, 3)
    assert tuple(single.shape) == (512, 512, 3)


@pytest.mark.parametrize("content", [None, "not an image"])
def test_a_folder_without_dicom_names_the_folder(tmp_path, content):
    folder = tmp_path / "empty_series"
    folder.mkdir()
    if content:
        (folder / "notes.txt").write_text(content)
    with pytest.raises(FileNotFoundError, match="no DICOM series") as error:
        read_ct(folder)
    assert "empty_series" in str(error.value)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.nii.gz"):
        read_ct(tmp_path / "absent.nii.gz")


# --- NIfTI chest crops ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "shape"), [("a", (120, 126, 164)), ("b", (122, 102, 112))])
def test_chest_crops(name, shape):
    path = require_data(f"ct/chest_crops/chest_crop_{name}.nii.gz")
    volume = read_ct(path)
    assert tuple(volume.shape) == shape
    np.testing.assert_allclose(volume.meta["spacing"], [1.5, 1.5, 1.5])
    np.testing.assert_allclose(np.abs(np.diag(volume.affine.numpy()))[:3], [1.5, 1.5, 1.5])
    # the same geometry and voxels as nibabel's reading of the header
    image = nib.load(path)
    np.testing.assert_allclose(volume.affine.numpy(), image.affine, atol=1e-4)
    np.testing.assert_array_equal(volume.numpy(), np.asanyarray(image.dataobj))
    assert volume.numpy().min() >= -1100 and volume.numpy().max() < 4000


# --- images of the wrong dimension ------------------------------------------------------------------


def test_a_2d_nifti_is_rejected(tmp_path):
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 9), np.int16), np.eye(4)), path)
    with pytest.raises(ValueError, match="expected a 3-D volume") as error:
        read_ct(path)
    assert "slice.nii.gz" in str(error.value)


def test_a_2d_mha_and_a_4d_nifti_are_rejected(tmp_path):
    itk.imwrite(itk.image_from_array(np.zeros((8, 9), np.float32)), str(tmp_path / "plane.mha"))
    with pytest.raises(ValueError, match=r"plane\.mha.*expected a 3-D volume"):
        read_ct(tmp_path / "plane.mha")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.int16), np.eye(4)), tmp_path / "series.nii.gz")
    with pytest.raises(ValueError, match=r"series\.nii\.gz.*expected a 3-D volume"):
        read_ct(tmp_path / "series.nii.gz")


# --- writing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "atol"), [(".nii.gz", 1e-4), (".nii", 1e-4), (".mha", 1e-9), (".nrrd", 1e-9)])
def test_write_read_round_trip(tmp_path, suffix, atol):
    values = torch.from_numpy(np.random.default_rng(0).integers(-1024, 2000, size=(7, 6, 5)).astype(np.int16))
    image = MetaTensor(values, affine=torch.as_tensor(OBLIQUE))
    path = tmp_path / "out" / f"volume{suffix}"
    write_image(path, image)
    back = read_ct(path)
    assert back.dtype == torch.int16
    np.testing.assert_array_equal(back.numpy(), values.numpy())
    np.testing.assert_allclose(back.affine.numpy(), OBLIQUE, atol=atol)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left
    write_image(path, MetaTensor(values[None].float() * 0.5, affine=torch.as_tensor(OBLIQUE)))  # channel, replace
    assert read_ct(path).dtype == torch.float32


def test_write_keeps_the_popi_geometry(popi, tmp_path):
    crop = popi[200:240, 180:230, 60:70]  # a crop keeps spacing and direction; only its origin moves
    write_image(tmp_path / "crop.mha", crop)
    back = read_ct(tmp_path / "crop.mha")
    np.testing.assert_array_equal(back.numpy(), crop.numpy())
    np.testing.assert_allclose(back.affine.numpy(), crop.affine.numpy(), atol=1e-9)
    np.testing.assert_allclose(back.meta["direction"], popi.meta["direction"])


def test_write_rejects_what_it_cannot_write(tmp_path):
    image = MetaTensor(torch.zeros(4, 4, 4))
    with pytest.raises(ValueError, match="unsupported suffix"):
        write_image(tmp_path / "volume.mhd", image)
    with pytest.raises(ValueError, match="3-D volume"):
        write_image(tmp_path / "volume.mha", MetaTensor(torch.zeros(4, 4)))
    with pytest.raises(ValueError, match="affine="):
        write_image(tmp_path / "volume.mha", np.zeros((4, 4, 4)))
    write_image(tmp_path / "mask.nrrd", np.ones((4, 4, 4), bool), affine=np.eye(4))
    assert read_ct(tmp_path / "mask.nrrd").dtype == torch.uint8


# --- DIR-Lab raw volumes -----------------------------------------------------------------------------


def test_dirlab_table():
    assert len(DIRLAB_GEOMETRY) == 20
    assert DIRLAB_GEOMETRY["case1"].shape == (256, 256, 94)
    assert DIRLAB_GEOMETRY["case5"].spacing == (1.10, 1.10, 2.5)
    assert DIRLAB_GEOMETRY["case7"].shape == (512, 512, 136)
    assert DIRLAB_GEOMETRY["copd9"].spacing == (0.664, 0.664, 2.5)
    assert DIRLAB_GEOMETRY["copd10"].shape == (512, 512, 135)
    np.testing.assert_allclose(dirlab_affine("copd3"), np.diag([-0.652, -0.652, 2.5, 1.0]))


@pytest.mark.parametrize(
    ("name", "case"),
    [
        ("case1_T00_s.img", "case1"),
        ("copd3_iBHCT.img", "copd3"),
        ("COPD10_eBHCT.img", "copd10"),
        ("Case10Pack/Images/case10_T50.img", "case10"),
        ("Case4Pack/Images/T00.img", "case4"),
        ("copd_07/eBH.img", "copd7"),
    ],
)
def test_dirlab_case_from_the_name(name, case):
    assert dirlab_geometry(name).case == case


@pytest.mark.parametrize(("name", "message"), [("scan.img", "cannot tell"), ("case11_T00.img", "unknown")])
def test_dirlab_unknown_case_names_the_file(name, message):
    with pytest.raises(ValueError, match=message) as error:
        dirlab_geometry(name)
    assert name in str(error.value)


@pytest.fixture(scope="module")
def case1_volume():
    """A synthetic int16 volume of DIR-Lab case1's size, stored values (HU + 1024)."""
    return np.random.default_rng(3).integers(-2000, 3000, size=DIRLAB_GEOMETRY["case1"].shape).astype(np.int16)


def test_dirlab_file_reads_in_hounsfield_units(tmp_path, case1_volume):
    path = tmp_path / "case1_T00_s.img"
    _write_raw(path, case1_volume)
    volume = read_ct(path)
    assert tuple(volume.shape) == (256, 256, 94) and volume.dtype == torch.int16
    np.testing.assert_array_equal(volume.numpy(), case1_volume.astype(np.int32) - 1024)
    np.testing.assert_allclose(volume.meta["spacing"], [0.97, 0.97, 2.5])
    np.testing.assert_allclose(volume.meta["origin"], [0, 0, 0])
    np.testing.assert_allclose(volume.meta["direction"], np.eye(3))
    np.testing.assert_allclose(volume.affine.numpy(), np.diag([-0.97, -0.97, 2.5, 1.0]))
    assert volume.meta["dirlab_case"] == "case1"
    raw = read_ct(path, reader=DirLabReader(intensity_offset=0))
    np.testing.assert_array_equal(raw.numpy(), case1_volume)


def test_dirlab_reader_matches_itk_reader(tmp_path, case1_volume):
    """The same voxels and spacing as an ITK image load identically through LoadImage (array and affine)."""
    _write_raw(tmp_path / "case1_T50_s.img", case1_volume)
    reference = itk.image_from_array(np.ascontiguousarray(case1_volume.transpose(2, 1, 0)))
    reference.SetSpacing([0.97, 0.97, 2.5])
    itk.imwrite(reference, str(tmp_path / "reference.mha"))
    ours = LoadImage(reader=DirLabReader(intensity_offset=0), image_only=True, dtype=None)(tmp_path / "case1_T50_s.img")
    theirs = LoadImage(reader=ITKReader(), image_only=True, dtype=None)(tmp_path / "reference.mha")
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert torch.equal(ours.as_tensor(), theirs.as_tensor())
    np.testing.assert_allclose(ours.affine.numpy(), theirs.affine.numpy())
    np.testing.assert_array_equal(ours.meta["spatial_shape"], theirs.meta["spatial_shape"])
    np.testing.assert_allclose(ours.meta["spacing"], theirs.meta["spacing"])
    # and the bundle's first transforms treat them alike
    prepare = Compose([EnsureChannelFirst(channel_dim="no_channel"), Orientation("RAS", labels=None)])
    a, b = prepare(ours), prepare(theirs)
    assert torch.equal(a.as_tensor(), b.as_tensor())
    np.testing.assert_allclose(a.affine.numpy(), b.affine.numpy())


def test_dirlab_reader_in_a_dictionary_pipeline(tmp_path, case1_volume):
    """As a bundle config names it, with other formats in the same datalist still read by MONAI's readers."""
    _write_raw(tmp_path / "case1_T00_s.img", case1_volume)
    small = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    _write_raw(tmp_path / "scan.img", small)
    write_image(tmp_path / "moving.nii.gz", MetaTensor(torch.from_numpy(small)))

    by_name = LoadImaged(["fixed", "moving"], reader="rrn_lung_registration.io.ct_io.DirLabReader", image_only=True)
    item = by_name({"fixed": str(tmp_path / "case1_T00_s.img"), "moving": str(tmp_path / "moving.nii.gz")})
    np.testing.assert_array_equal(item["fixed"].numpy(), case1_volume.astype(np.float32) - 1024)
    np.testing.assert_allclose(item["fixed"].affine.numpy(), np.diag([-0.97, -0.97, 2.5, 1.0]))
    np.testing.assert_array_equal(item["moving"].numpy(), small)

    # options go to an instance ({"_target_": "rrn_lung_registration.io.ct_io.DirLabReader", ...} in a config)
    reader = DirLabReader(shape=(6, 5, 4), spacing=(1.0, 1.0, 2.5), intensity_offset=0)
    item = LoadImaged(["fixed", "moving"], reader=reader, image_only=True)(
        {"fixed": str(tmp_path / "scan.img"), "moving": str(tmp_path / "moving.nii.gz")}
    )
    np.testing.assert_array_equal(item["fixed"].numpy(), small)
    np.testing.assert_allclose(item["fixed"].affine.numpy(), np.diag([-1.0, -1.0, 2.5, 1.0]))
    np.testing.assert_array_equal(item["moving"].numpy(), small)


def test_dirlab_wrong_size_names_the_file(tmp_path):
    path = tmp_path / "copd2_iBHCT.img"
    np.zeros(512 * 512 * 10, np.int16).tofile(path)
    with pytest.raises(ValueError, match=r"copd2_iBHCT\.img.*512x512x102") as error:
        read_ct(path)
    assert "bytes" in str(error.value)
    with pytest.raises(ValueError, match="copd2_iBHCT.img"):
        DirLabReader().read(path)


def test_dirlab_explicit_geometry_and_options(tmp_path):
    volume = np.random.default_rng(4).integers(0, 2000, size=(6, 5, 4)).astype(np.int16)
    path = tmp_path / "renamed.img"
    _write_raw(path, volume)
    with pytest.raises(ValueError, match="renamed.img"):
        read_ct(path)  # no case in the name
    reader = DirLabReader(shape=(6, 5, 4), spacing=(0.5, 0.6, 2.0), intensity_offset=-1000.5)
    read = read_ct(path, reader=reader)
    assert read.dtype == torch.float32
    np.testing.assert_allclose(read.numpy(), volume - 1000.5)
    np.testing.assert_allclose(read.meta["spacing"], [0.5, 0.6, 2.0])
    flipped = read_ct(path, reader=DirLabReader(shape=(6, 5, 4), spacing=(1, 1, 2), direction=np.diag([1, 1, -1])))
    np.testing.assert_allclose(flipped.affine.numpy(), np.diag([-1.0, -1.0, -2.0, 1.0]))
    with pytest.raises(ValueError, match="spacing"):
        DirLabReader(shape=(6, 5, 4))
    # an Analyze pair (.hdr beside the .img) is not taken for a DIR-Lab dump
    assert DirLabReader().verify_suffix(path)
    (tmp_path / "renamed.hdr").write_bytes(b"")
    assert not DirLabReader().verify_suffix(path)
