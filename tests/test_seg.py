"""DICOM SEG decoding (prrtquant.dicom.seg) against real SEGs from dcmqi and a synthetic FRACTIONAL SEG.

Real data: dcmqi's data/segmentations samples (QIICR/dcmqi, BSD-3-Clause), bundled in
tests/data/external/dcmqi_ct_seg (see its README.md) and unpacked by the ``dcmqi_ct_seg`` fixture of
conftest.py.
The reference grids are built here from the DICOM headers with pydicom only (slices sorted by their
position along the slice normal), and the label maps are read with SimpleITK, so neither side of a
comparison goes through prrtquant's own DICOM code.

What the data looks like (worth knowing when reading the tests):

* ``ct-3slice/01.dcm`` is the *top* slice (z = -126.69) and ``03.dcm`` the bottom one (z = -128.69),
  i.e. file/instance order is the reverse of position order, while the frames of ``liver.dcm`` are
  stored bottom-up. Only placement by position gives the label map back.
* The CT slices are 1.0 mm apart although SliceThickness is 1.25 mm; the grid spacing must come from
  the positions.
* ``23x38x3`` has 23 columns × 38 rows: 874 pixels per frame, so the BINARY frames of its SEG are not
  byte aligned in the bit-packed PixelData (``24x38x3`` is the aligned twin).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from prrtquant.geometry import Grid
from prrtquant.dicom.seg import SegError, SegSegment, read_seg

LIVER_VOXELS = 107_098

# partial_overlaps.dcm holds 5 segments; since segments 1 (GREEN) and 2 (ORANGE) overlap (3,017
# voxels on the middle slice) and both overlap 3 (PURPLE), dcmqi's source was three label maps.
# Worked out from the label values present in each file (each segment's number is its label value):
#   partial_overlaps-1.nrrd: labels 1, 4, 5  -> GREEN (middle slice), LIGHT_BLUE and DARK_BLUE (bottom)
#   partial_overlaps-2.nrrd: label 2         -> ORANGE (middle slice)
#   partial_overlaps-3.nrrd: label 3         -> PURPLE (all three slices)
PARTIAL_OVERLAPS = {
    1: ("GREEN", "partial_overlaps-1.nrrd"),
    2: ("ORANGE", "partial_overlaps-2.nrrd"),
    3: ("PURPLE", "partial_overlaps-3.nrrd"),
    4: ("LIGHT_BLUE", "partial_overlaps-1.nrrd"),
    5: ("DARK_BLUE", "partial_overlaps-1.nrrd"),
}


@pytest.fixture(scope="module")
def data(dcmqi_ct_seg: Path) -> Path:
    if not (dcmqi_ct_seg / "liver.dcm").is_file():
        pytest.fail(f"test data missing: expected the dcmqi CT/SEG files in {dcmqi_ct_seg} "
                    "(see tests/data/external/README.md)")
    return dcmqi_ct_seg


# --------------------------------------------------------------------------------------------------
# independent helpers: grids from DICOM headers, label maps via SimpleITK, shuffled SEG copies


def _floats(values: Any) -> Any:
    return tuple(float(v) for v in values)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def grid_from_planes(positions: list[np.ndarray], iop: np.ndarray, pixel_spacing: tuple[float, float],
                     rows: int, cols: int) -> Grid:
    """Grid of a stack of parallel planes, sorted by position along the normal (any input order)."""
    r, c = _unit(iop[:3]), _unit(iop[3:])
    n = np.cross(r, c)
    pos = sorted(positions, key=lambda p: float(np.dot(n, p)))
    z = np.array([float(np.dot(n, p)) for p in pos])
    steps = np.diff(z)
    assert len(pos) > 1 and np.allclose(steps, steps[0], atol=1e-3), f"irregular slice positions {z}"
    return Grid(
        size=(cols, rows, len(pos)),
        spacing=(float(pixel_spacing[1]), float(pixel_spacing[0]), float(steps.mean())),
        origin=tuple(float(v) for v in pos[0]),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in np.column_stack([r, c, n]).ravel()),
    )


def grid_from_slices(files: list[Path]) -> Grid:
    """Grid of a single-frame series, from the headers only; the order of ``files`` is irrelevant."""
    dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
    for ds in dss:
        assert np.allclose(np.array(ds.ImageOrientationPatient, dtype=float), iop, atol=1e-6)
    return grid_from_planes(
        [np.array(ds.ImagePositionPatient, dtype=float) for ds in dss], iop,
        (float(dss[0].PixelSpacing[0]), float(dss[0].PixelSpacing[1])), int(dss[0].Rows), int(dss[0].Columns),
    )


def grid_from_multiframe(file: Path) -> Grid:
    """Grid of an enhanced multi-frame image (per-frame positions, shared orientation/spacing)."""
    ds = pydicom.dcmread(file, stop_before_pixels=True)
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    ps = shared.PixelMeasuresSequence[0].PixelSpacing
    positions = [np.array(fg.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
                 for fg in ds.PerFrameFunctionalGroupsSequence]
    return grid_from_planes(positions, iop, (float(ps[0]), float(ps[1])), int(ds.Rows), int(ds.Columns))


def label_map(path: Path, grid: Grid) -> np.ndarray:
    """A label map as a (z, y, x) array, after checking it lies on ``grid``."""
    img = sitk.ReadImage(str(path))
    assert img.GetSize() == grid.size, (path.name, img.GetSize(), grid.size)
    assert np.allclose(img.GetSpacing(), grid.spacing, atol=1e-4), (path.name, img.GetSpacing(), grid.spacing)
    assert np.allclose(img.GetOrigin(), grid.origin, atol=1e-4), (path.name, img.GetOrigin(), grid.origin)
    assert np.allclose(img.GetDirection(), grid.direction, atol=1e-6), (path.name, img.GetDirection())
    return sitk.GetArrayFromImage(img)


def shuffled_seg_copy(src: Path, dst: Path, perm: list[int]) -> Path:
    """Copy of a native-encoded SEG whose frame i is the source's frame perm[i].

    The per-frame functional groups and the frames of PixelData are permuted together, so the file
    stays a valid SEG describing the same segmentation; only the storage order changes. BINARY
    frames are unpacked to bits first (they need not start on a byte boundary) and packed again.
    """
    ds = pydicom.dcmread(src)
    assert not ds.file_meta.TransferSyntaxUID.is_compressed
    n = int(ds.NumberOfFrames)
    assert sorted(perm) == list(range(n))
    npx = int(ds.Rows) * int(ds.Columns)
    raw = np.frombuffer(ds.PixelData, dtype=np.uint8)
    if ds.BitsAllocated == 1:
        bits = np.unpackbits(raw, bitorder="little")[: n * npx].reshape(n, npx)
        data = np.packbits(bits[perm].ravel(), bitorder="little").tobytes()
    else:
        frames = raw[: n * npx * ds.BitsAllocated // 8].reshape(n, -1)
        data = frames[perm].tobytes()
    if len(data) % 2:
        data += b"\0"
    ds.PixelData = data
    ds.PerFrameFunctionalGroupsSequence = Sequence([ds.PerFrameFunctionalGroupsSequence[i] for i in perm])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dst, enforce_file_format=True)
    # sanity: the storage order really changed
    before = pydicom.dcmread(src).pixel_array.reshape(n, -1)
    after = pydicom.dcmread(dst).pixel_array.reshape(n, -1)
    assert np.array_equal(after, before[perm])
    return dst


def ct_grid(data: Path) -> Grid:
    return grid_from_slices(sorted((data / "ct-3slice").glob("*.dcm")))


def only(segments: list[SegSegment]) -> SegSegment:
    assert len(segments) == 1, [(s.number, s.label) for s in segments]
    return segments[0]


# --------------------------------------------------------------------------------------------------
# liver.dcm


def test_liver_matches_label_map_voxel_for_voxel(data: Path) -> None:
    grid = ct_grid(data)
    assert grid.size == (512, 512, 3) and abs(grid.spacing[2] - 1.0) < 1e-4
    seg = only(read_seg(data / "liver.dcm", grid))
    ref = label_map(data / "liver_seg.nrrd", grid)
    assert (seg.number, seg.label) == (1, "Liver")
    assert seg.mask.dtype == np.bool_ and seg.mask.shape == grid.shape_zyx
    assert int(seg.mask.sum()) == LIVER_VOXELS
    assert np.array_equal(seg.mask, ref == 1)
    # the slices carry different content, so a wrong placement could not pass by accident
    assert len({int(s.sum()) for s in seg.mask}) == 3


@pytest.mark.parametrize("order", [(2, 1, 0), (1, 2, 0), (0, 2, 1)])
def test_liver_independent_of_slice_file_order(data: Path, order: tuple[int, int, int]) -> None:
    files = sorted((data / "ct-3slice").glob("*.dcm"))
    grid = grid_from_slices([files[i] for i in order])
    assert grid == ct_grid(data)
    seg = only(read_seg(data / "liver.dcm", grid))
    assert np.array_equal(seg.mask, label_map(data / "liver_seg.nrrd", grid) == 1)


def test_liver_on_grid_with_reversed_slice_axis(data: Path) -> None:
    """Same slices, but the grid's z index runs against the normal: the mask comes out flipped in z."""
    g = ct_grid(data)
    d = g.direction_matrix.copy()
    top = g.index_to_physical(np.array([[0.0, 0.0, g.size[2] - 1]]))[0]
    d[:, 2] *= -1
    flipped = replace(g, origin=_floats(top), direction=_floats(d.ravel()))
    seg = only(read_seg(data / "liver.dcm", flipped))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "liver_seg.nrrd")))
    assert np.array_equal(seg.mask, ref[::-1] == 1)


@pytest.mark.parametrize("perm", [[2, 0, 1], [1, 2, 0], [2, 1, 0]])
def test_liver_with_shuffled_frames(data: Path, tmp_path: Path, perm: list[int]) -> None:
    shuffled = shuffled_seg_copy(data / "liver.dcm", tmp_path / "liver_shuffled.dcm", perm)
    grid = ct_grid(data)
    seg = only(read_seg(shuffled, grid))
    assert int(seg.mask.sum()) == LIVER_VOXELS
    assert np.array_equal(seg.mask, label_map(data / "liver_seg.nrrd", grid) == 1)


# --------------------------------------------------------------------------------------------------
# partial_overlaps.dcm


def test_partial_overlaps_each_segment_matches_its_label_map(data: Path) -> None:
    grid = ct_grid(data)
    segments = read_seg(data / "partial_overlaps.dcm", grid)
    assert [(s.number, s.label) for s in segments] == [(n, lab) for n, (lab, _) in PARTIAL_OVERLAPS.items()]
    maps = {f: label_map(data / f, grid) for f in {f for _, f in PARTIAL_OVERLAPS.values()}}
    by_number = {s.number: s.mask for s in segments}
    for number, (label, file) in PARTIAL_OVERLAPS.items():
        mask = by_number[number]
        assert mask.any(), label
        assert np.array_equal(mask, maps[file] == number), f"segment {number} {label} vs {file}"
    # the overlaps that forced three label maps are really there
    assert int((by_number[1] & by_number[2]).sum()) == 3017
    assert (by_number[1] & by_number[3]).any() and (by_number[2] & by_number[3]).any()
    # the frames of segment 3 are stored bottom, middle, top but 1 and 2 only on the middle slice
    assert [bool(by_number[1][k].any()) for k in range(3)] == [False, True, False]
    assert [bool(by_number[3][k].any()) for k in range(3)] == [True, True, True]


def test_partial_overlaps_with_shuffled_frames(data: Path, tmp_path: Path) -> None:
    grid = ct_grid(data)
    original = read_seg(data / "partial_overlaps.dcm", grid)
    shuffled = read_seg(shuffled_seg_copy(data / "partial_overlaps.dcm", tmp_path / "po.dcm",
                                          [6, 3, 0, 5, 2, 4, 1]), grid)
    assert [(s.number, s.label) for s in shuffled] == [(s.number, s.label) for s in original]
    for a, b in zip(original, shuffled):
        assert np.array_equal(a.mask, b.mask), a.label


# --------------------------------------------------------------------------------------------------
# 23x38x3 and 24x38x3 (non-square; 23x38 frames are not byte aligned in the bit-packed PixelData)


@pytest.mark.parametrize("case", ["23x38x3", "24x38x3"])
def test_small_images_seg_matches_label_map(data: Path, case: str) -> None:
    folder = data / case
    grid = grid_from_slices(sorted((folder / "image").glob("*.dcm")))
    cols = int(case.split("x")[0])
    assert grid.size == (cols, 38, 3) and grid.shape_zyx == (3, 38, cols)
    # the multi-frame version of the image defines the same grid
    mf = grid_from_multiframe(folder / "multiframe" / "mf.dcm")
    assert mf.size == grid.size
    assert np.allclose(mf.spacing, grid.spacing) and np.allclose(mf.origin, grid.origin)
    assert np.allclose(mf.direction, grid.direction)
    ref = label_map(folder / "nrrd" / "label.nrrd", grid)
    for g in (grid, mf):
        seg = only(read_seg(folder / "seg" / "label.seg", g))
        assert seg.label == "Liver"
        assert seg.mask.shape == (3, 38, cols)
        assert np.array_equal(seg.mask, ref == 1)
    assert int(seg.mask.sum()) == int((ref == 1).sum()) > 0


def test_frames_placed_inside_a_larger_grid(data: Path) -> None:
    """Frames smaller than the grid land at their in-plane offset (grid padded by 3 columns, 2 rows)."""
    folder = data / "23x38x3"
    g = grid_from_slices(sorted((folder / "image").glob("*.dcm")))
    d = g.direction_matrix
    origin = np.asarray(g.origin) - 3 * g.spacing[0] * d[:, 0] - 2 * g.spacing[1] * d[:, 1]
    big = replace(g, size=(g.size[0] + 5, g.size[1] + 4, g.size[2]), origin=_floats(origin))
    seg = only(read_seg(folder / "seg" / "label.seg", big))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "nrrd" / "label.nrrd"))) == 1
    assert np.array_equal(seg.mask, np.pad(ref, ((0, 0), (2, 2), (3, 2))))


def test_unaligned_binary_frames_shuffled(data: Path, tmp_path: Path) -> None:
    folder = data / "23x38x3"
    grid = grid_from_slices(sorted((folder / "image").glob("*.dcm")))
    shuffled = shuffled_seg_copy(folder / "seg" / "label.seg", tmp_path / "label.seg", [1, 2, 0])
    seg = only(read_seg(shuffled, grid))
    assert np.array_equal(seg.mask, label_map(folder / "nrrd" / "label.nrrd", grid) == 1)


# --------------------------------------------------------------------------------------------------
# a FRACTIONAL SEG made with highdicom on a synthetic, oblique, non-square CT series

ROWS, COLS, N_SLICES = 5, 7, 4
PIXEL_SPACING = (0.9, 1.3)  # (between rows, between columns)
SLICE_SPACING = 2.0
SERIES_ORIGIN = np.array([-3.0, 2.0, -1.0])


def _oblique_axes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b = np.deg2rad(30.0), np.deg2rad(20.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = rx @ rz
    return m[:, 0], m[:, 1], m[:, 2]


def _fraction(points: np.ndarray) -> np.ndarray:
    """A smooth field in [0, 1] of physical position, with exact 0s and 1s; 0 on the first slice."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    f = np.clip(0.5 + 0.15 * x - 0.1 * y + 0.05 * z, 0.0, 1.0)
    height = (points - SERIES_ORIGIN) @ _oblique_axes()[2]  # distance from the first slice plane
    return np.where(height < 1.0, 0.0, f)


def _write_ct_series(folder: Path) -> list[Path]:
    """N_SLICES single-frame CT files; written (and numbered) in a scrambled slice order."""
    folder.mkdir()
    r, c, n = _oblique_axes()
    origin = SERIES_ORIGIN
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    files = []
    for number, k in enumerate([2, 0, 3, 1], start=1):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = "Seg^Test", "SEG01"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study, "1", "A1"
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20240101", "120000", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series, 1, "CT"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_ref, ""
        ds.Manufacturer, ds.InstanceNumber = "test", number
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [round(float(v), 6) for v in origin + k * SLICE_SPACING * n]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*r, *c)]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = SLICE_SPACING
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.full((ROWS, COLS), 1024, dtype=np.int16).tobytes()
        path = folder / f"ct{number:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _pixel_points(ds: Dataset) -> np.ndarray:
    """Physical centres (rows, cols, 3) of a single-frame image's pixels, from its header."""
    ipp = np.array(ds.ImagePositionPatient, dtype=float)
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    dy, dx = (float(v) for v in ds.PixelSpacing)
    jj, ii = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
    return ipp + (ii * dx)[..., None] * iop[:3] + (jj * dy)[..., None] * iop[3:]


def _grid_points(grid: Grid) -> np.ndarray:
    """Physical centres (z, y, x, 3) of a grid's voxels, computed here from its definition."""
    d = grid.direction_matrix
    kk, jj, ii = np.meshgrid(*(np.arange(s) for s in grid.shape_zyx), indexing="ij")
    sx, sy, sz = grid.spacing
    return (np.asarray(grid.origin) + (ii * sx)[..., None] * d[:, 0] + (jj * sy)[..., None] * d[:, 1]
            + (kk * sz)[..., None] * d[:, 2])


@pytest.fixture(scope="module")
def fractional(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Grid]:
    """A 2-segment FRACTIONAL SEG (segment 2 = 1 - segment 1 where segment 1 > 0) on an oblique series."""
    root = tmp_path_factory.mktemp("fractional")
    files = _write_ct_series(root / "ct")
    sources = [pydicom.dcmread(f) for f in files]  # scrambled slice order on purpose
    f1 = np.stack([_fraction(_pixel_points(ds)) for ds in sources])
    f2 = np.where(f1 > 0, 1.0 - f1, 0.0)
    pixels = np.stack([f1, f2], axis=-1).astype(np.float32)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i, segment_label=label,
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, label in ((1, "Uptake"), (2, "Rest"))
    ]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=100,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="prrtquant tests",
        manufacturer_model_name="test_seg", software_versions="0", device_serial_number="0",
        max_fractional_value=255,
    )
    path = root / "fractional.dcm"
    seg.save_as(path)
    return path, grid_from_slices(files)


def _expected_fractions(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    f1 = _fraction(_grid_points(grid))
    return f1, np.where(f1 > 0, 1.0 - f1, 0.0)


def test_fractional_seg_fractions(fractional: tuple[Path, Grid]) -> None:
    path, grid = fractional
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.SegmentationType == "FRACTIONAL" and int(ds.MaximumFractionalValue) == 255
    assert int(ds.NumberOfFrames) == 2 * (N_SLICES - 1)  # highdicom omitted the empty bottom frames
    segments = read_seg(path, grid)
    assert [(s.number, s.label) for s in segments] == [(1, "Uptake"), (2, "Rest")]
    for seg, expected in zip(segments, _expected_fractions(grid)):
        assert seg.mask.dtype == np.float32 and seg.mask.shape == (N_SLICES, ROWS, COLS)
        assert 0.0 <= seg.mask.min() and seg.mask.max() <= 1.0
        assert np.abs(seg.mask - expected).max() <= 1.0 / 255 + 1e-6
        # exact ends survive quantisation
        assert np.array_equal(seg.mask == 0, expected == 0)
        assert np.array_equal(seg.mask == 1, expected == 1)
    # the field has some partial values, zeros, ones and an empty bottom slice (frames omitted)
    f1 = segments[0].mask
    assert ((f1 > 0) & (f1 < 1)).sum() > 20 and (f1 == 1).any() and not f1[0].any()


def test_fractional_seg_shuffled_frames(fractional: tuple[Path, Grid], tmp_path: Path) -> None:
    path, grid = fractional
    n = int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames)
    perm = list(range(n))[::-1]
    perm = perm[1::2] + perm[0::2]
    original = read_seg(path, grid)
    shuffled = read_seg(shuffled_seg_copy(path, tmp_path / "shuffled.dcm", perm), grid)
    for a, b in zip(original, shuffled):
        assert np.array_equal(a.mask, b.mask)


# --------------------------------------------------------------------------------------------------
# geometry errors


def _shifted(grid: Grid, slices: float) -> Grid:
    origin = np.asarray(grid.origin) + slices * grid.spacing[2] * grid.direction_matrix[:, 2]
    return replace(grid, origin=_floats(origin))


def test_frame_outside_grid_raises_naming_file(data: Path) -> None:
    grid = _shifted(ct_grid(data), 2)  # the two lower SEG frames fall below the grid
    with pytest.raises(SegError) as err:
        read_seg(data / "liver.dcm", grid)
    msg = str(err.value)
    assert "liver.dcm" in msg and "segment 1" in msg and "Liver" in msg and "-128.690" in msg


def test_frame_between_slices_raises_unless_tolerated(data: Path) -> None:
    grid = _shifted(ct_grid(data), -0.3)  # 0.3 mm off every slice plane; default tolerance 0.5 mm
    seg = only(read_seg(data / "liver.dcm", grid))
    assert int(seg.mask.sum()) == LIVER_VOXELS
    with pytest.raises(SegError, match=r"liver\.dcm.*does not coincide"):
        read_seg(data / "liver.dcm", grid, tolerance_mm=0.1)


def test_in_plane_offset_raises(data: Path) -> None:
    g = ct_grid(data)
    shifted = replace(g, origin=(g.origin[0] + 3.3, *g.origin[1:]))  # 4.07 pixels to the right
    with pytest.raises(SegError, match=r"liver\.dcm"):
        read_seg(data / "liver.dcm", shifted)


def test_orientation_mismatch_raises(data: Path) -> None:
    g = ct_grid(data)
    d = g.direction_matrix[:, [1, 0, 2]]  # x and y axes swapped
    swapped = replace(g, direction=_floats(d.ravel()))
    with pytest.raises(SegError, match=r"liver\.dcm.*orientation"):
        read_seg(data / "liver.dcm", swapped)


def test_two_frames_on_one_slice_raise(data: Path) -> None:
    g = ct_grid(data)
    coarse = replace(g, size=(512, 512, 2), spacing=(g.spacing[0], g.spacing[1], 2.0))
    with pytest.raises(SegError, match=r"liver\.dcm.*already occupies"):
        read_seg(data / "liver.dcm", coarse, tolerance_mm=1.5)


def test_not_a_seg_raises(data: Path) -> None:
    with pytest.raises(SegError, match=r"01\.dcm"):
        read_seg(data / "ct-3slice" / "01.dcm", ct_grid(data))
