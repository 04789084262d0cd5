"""Writers for the synthetic patient's DICOM objects: CT, PET, NM (SPECT), MR, RTSTRUCT, SEG.

The objects look like a hospital PACS export: one study per session, per-slice CT/PET/MR files,
multi-frame NM reconstructions with their geometry in the Detector Information Sequence, and
structure sets referencing the reference CT. UIDs are derived deterministically from the seed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from .. import __version__
from ..dicom.write import new_dataset, uid
from ..geometry import Grid
from ..radionuclides import Radionuclide

Array = np.ndarray

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PET_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
NM_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"

@dataclass(frozen=True)
class PatientInfo:
    name: str
    patient_id: str
    birth_date: str  # YYYYMMDD
    sex: str  # M / F
    weight_kg: float
    height_m: float


@dataclass(frozen=True)
class SeriesInfo:
    """What a series needs to know about where it lives."""

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    study_datetime: dt.datetime
    series_datetime: dt.datetime
    series_number: int
    series_description: str
    study_description: str
    accession: str
    study_id: str


def _dt(d: dt.datetime) -> tuple[str, str]:
    return d.strftime("%Y%m%d"), d.strftime("%H%M%S.%f")[:13]


def _patient_study_series(ds: Dataset, patient: PatientInfo, s: SeriesInfo, modality: str) -> None:
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientWeight = f"{patient.weight_kg:.1f}"
    ds.PatientSize = f"{patient.height_m:.2f}"
    ds.StudyInstanceUID = s.study_uid
    ds.StudyDate, ds.StudyTime = _dt(s.study_datetime)
    ds.StudyID = s.study_id
    ds.AccessionNumber = s.accession
    ds.StudyDescription = s.study_description
    ds.ReferringPhysicianName = "Synthetic^Referrer"
    ds.SeriesInstanceUID = s.series_uid
    ds.SeriesNumber = s.series_number
    ds.SeriesDate, ds.SeriesTime = _dt(s.series_datetime)
    ds.SeriesDescription = s.series_description
    ds.Modality = modality
    ds.FrameOfReferenceUID = s.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.Manufacturer = "prrtquant phantom"
    ds.ManufacturerModelName = "synthetic"
    ds.InstitutionName = "Synthetic Hospital"
    ds.StationName = "PHANTOM"
    ds.SoftwareVersions = __version__
    ds.ContentDate, ds.ContentTime = _dt(s.series_datetime)


def _image_plane(ds: Dataset, grid: Grid, k: int) -> None:
    d = grid.direction_matrix
    pos = grid.index_to_physical(np.array([[0.0, 0.0, float(k)]]))[0]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])]
    ds.PixelSpacing = [f"{grid.spacing[1]:.6g}", f"{grid.spacing[0]:.6g}"]  # row spacing, column spacing
    ds.SliceThickness = f"{grid.spacing[2]:.6g}"
    ds.SliceLocation = f"{pos[2]:.4f}"
    ds.Rows, ds.Columns = grid.size[1], grid.size[0]


def _pixels(ds: Dataset, arr: Array, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(arr.astype(np.int16 if signed else np.uint16)).tobytes()


def _slice_order(grid: Grid) -> list[int]:
    """Instance 1 is the most superior slice, as most scanners number them."""
    return list(range(grid.size[2] - 1, -1, -1))


def write_ct(out_dir: Path, patient: PatientInfo, s: SeriesInfo, grid: Grid, hu: Array,
             kvp: float = 120.0) -> list[Dataset]:
    """One file per slice; ``hu`` is (z, y, x). Returns the datasets (for RTSTRUCT/SEG references)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stored = np.clip(np.rint(hu + np.float32(1024.0)), 0, 4095).astype(np.uint16)
    written: list[Dataset] = []
    for inst, k in enumerate(_slice_order(grid), start=1):
        ds = new_dataset(CT_STORAGE, uid(s.series_uid, "ct", k))
        _patient_study_series(ds, patient, s, "CT")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = inst
        ds.AcquisitionNumber = 1
        ds.AcquisitionDate, ds.AcquisitionTime = _dt(s.series_datetime)
        _image_plane(ds, grid, k)
        ds.KVP = f"{kvp:g}"
        ds.ConvolutionKernel = "B30f"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        _pixels(ds, stored[k], signed=False)
        ds.save_as(out_dir / f"IM{inst:05d}", enforce_file_format=True)
        written.append(ds)
    return written


def _radiopharmaceutical(nuclide: Radionuclide, pharmaceutical: str, route: str, injection: dt.datetime,
                         dose: float, pet: bool) -> Dataset:
    item = Dataset()
    item.Radiopharmaceutical = pharmaceutical
    item.RadiopharmaceuticalRoute = route
    item.RadiopharmaceuticalStartTime = injection.strftime("%H%M%S.%f")[:13]
    item.RadiopharmaceuticalStartDateTime = injection.strftime("%Y%m%d%H%M%S.%f")[:21]
    item.RadionuclideTotalDose = f"{dose:.6g}"
    item.RadionuclideHalfLife = f"{nuclide.half_life_s:.6g}"
    if pet and nuclide.positron_fraction is not None:
        item.RadionuclidePositronFraction = f"{nuclide.positron_fraction:.4g}"
    code = Dataset()
    code.CodeValue = nuclide.code_value
    code.CodingSchemeDesignator = "SCT"
    code.CodeMeaning = nuclide.code_meaning
    item.RadionuclideCodeSequence = DicomSequence([code])
    return item


@dataclass(frozen=True)
class EmissionInfo:
    nuclide: Radionuclide
    pharmaceutical: str
    route: str
    injection: dt.datetime
    injected_bq: float
    frame_duration_s: float


def write_pet(out_dir: Path, patient: PatientInfo, s: SeriesInfo, grid: Grid, bqml: Array, e: EmissionInfo,
              bed_slices: int = 0, decay_correction: str = "START") -> tuple[list[Dataset], Array]:
    """PET Image Storage, one file per slice, Units BQML, per-slice rescale slope.

    Values are decay corrected to the series start (DecayCorrection START) when
    ``decay_correction`` is START, or not corrected (NONE). ``bed_slices`` > 0 gives each bed
    position of that many slices its own, later, AcquisitionTime, as multi-bed scanners do.
    Returns the datasets and the stored values (after quantisation) in Bq/mL.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    nz = grid.size[2]
    stored_vals = np.zeros_like(bqml, dtype=np.float64)
    written: list[Dataset] = []
    for inst, k in enumerate(_slice_order(grid), start=1):
        sl = bqml[k]
        vmax = float(sl.max())
        slope = vmax / 32000.0 if vmax > 0 else 1.0
        q = np.clip(np.rint(sl / slope), -32768, 32767).astype(np.int16)
        stored_vals[k] = q.astype(np.float64) * float(f"{slope:.10g}")
        ds = new_dataset(PET_STORAGE, uid(s.series_uid, "pt", k))
        _patient_study_series(ds, patient, s, "PT")
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.InstanceNumber = inst
        bed = (inst - 1) // bed_slices if bed_slices else 0
        acq = s.series_datetime + dt.timedelta(seconds=bed * e.frame_duration_s)
        ds.AcquisitionDate, ds.AcquisitionTime = _dt(acq)
        _image_plane(ds, grid, k)
        ds.Units = "BQML"
        ds.CountsSource = "EMISSION"
        ds.SeriesType = ["WHOLE BODY", "IMAGE"]
        ds.CorrectedImage = ["NORM", "DTIM", "ATTN", "SCAT", "DECY", "RAN"] if decay_correction != "NONE" else [
            "NORM", "DTIM", "ATTN", "SCAT", "RAN"]
        ds.DecayCorrection = decay_correction
        ds.RandomsCorrectionMethod = "DLYD"
        ds.AttenuationCorrectionMethod = "CT"
        ds.ReconstructionMethod = "OSEM 3i21s PSF"
        ds.NumberOfSlices = nz
        ds.ImageIndex = inst
        ds.FrameReferenceTime = f"{(acq - s.series_datetime).total_seconds() * 1000.0:.1f}"
        ds.ActualFrameDuration = int(round(e.frame_duration_s * 1000))
        lam = e.nuclide.decay_constant_per_s
        ds.DecayFactor = f"{np.exp(lam * (acq - s.series_datetime).total_seconds()):.6f}"
        ds.DoseCalibrationFactor = "1"
        ds.RadiopharmaceuticalInformationSequence = DicomSequence(
            [_radiopharmaceutical(e.nuclide, e.pharmaceutical, e.route, e.injection, e.injected_bq, pet=True)])
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = f"{slope:.10g}"
        ds.RescaleType = "BQML"
        _pixels(ds, q, signed=True)
        ds.save_as(out_dir / f"IM{inst:05d}", enforce_file_format=True)
        written.append(ds)
    return written, stored_vals


#: how an NM reconstruction stores its values, as consoles do (see docs/nm_values.md)
NM_STORAGE_MODES = ("counts", "counts_scaled", "bqml_rwv", "bqml_rescale", "bqml_rwv_rescale", "starguide")


def write_nm(out_dir: Path, patient: PatientInfo, s: SeriesInfo, grid: Grid, values: Array, e: EmissionInfo,
             units: str, n_views: int, view_duration_s: float, negative_spacing: bool = False,
             bqml_slope: float | None = None, storage: str | None = None) -> Dataset:
    """NM Image Storage multi-frame reconstruction (RECON TOMO).

    ``values`` are counts (``units`` "CNTS") or Bq/mL ("BQML"). ``storage`` (default: ``counts`` for
    CNTS, ``bqml_rwv`` for BQML) is how they are written:

    * ``counts``: integer counts, no rescale, no Units (GE Xeleris, Siemens Flash3D style);
    * ``counts_scaled``: real-valued counts scaled into uint16 with RescaleSlope ≠ 1, Units CNTS;
    * ``bqml_rwv``: Bq/mL through a Real World Value Mapping (slope ``bqml_slope``), nothing else;
    * ``bqml_rescale``: Bq/mL as RescaleSlope with Units BQML, no mapping (GE Q.Metrix / Hermes style);
    * ``bqml_rwv_rescale``: both, agreeing (Siemens xSPECT Quant style);
    * ``starguide``: integer counts as GE StarGuide exports them: the acquisition time only in
      ImageComments (``$ImagingDuration$<ms>$``), no ActualFrameDuration, and no administered activity
      or injection time in the Radiopharmaceutical Information Sequence (they go in the SPECT sheet).

    Geometry is in the Detector Information Sequence; with ``negative_spacing`` the frames run from the
    most superior slice downwards and SpacingBetweenSlices is negative (frame k at IPP + k·SBS·(row × col)).
    """
    storage = storage or ("counts" if units == "CNTS" else "bqml_rwv")
    if storage not in NM_STORAGE_MODES:
        raise ValueError(f"unknown NM storage {storage!r}; known: {NM_STORAGE_MODES}")
    if (units == "CNTS") != (storage in ("counts", "counts_scaled", "starguide")):
        raise ValueError(f"NM storage {storage!r} does not hold {units}")
    out_dir.mkdir(parents=True, exist_ok=True)
    nz = grid.size[2]
    order = list(range(nz - 1, -1, -1)) if negative_spacing else list(range(nz))
    ds = new_dataset(NM_STORAGE, uid(s.series_uid, "nm"))
    _patient_study_series(ds, patient, s, "NM")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
    ds.InstanceNumber = 1
    ds.AcquisitionDate, ds.AcquisitionTime = _dt(s.series_datetime)
    ds.NumberOfFrames = nz
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x0054, 0x0080)
    ds.SliceVector = list(range(1, nz + 1))
    ds.NumberOfSlices = nz
    ds.Rows, ds.Columns = grid.size[1], grid.size[0]
    ds.PixelSpacing = [f"{grid.spacing[1]:.6g}", f"{grid.spacing[0]:.6g}"]
    ds.SliceThickness = f"{grid.spacing[2]:.6g}"
    ds.SpacingBetweenSlices = f"{-grid.spacing[2] if negative_spacing else grid.spacing[2]:.6g}"
    det = Dataset()
    d = grid.direction_matrix
    first = grid.index_to_physical(np.array([[0.0, 0.0, float(order[0])]]))[0]
    det.ImagePositionPatient = [f"{v:.4f}" for v in first]
    det.ImageOrientationPatient = [f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])]
    det.CollimatorGridName = "MELP"
    det.CollimatorType = "PARA"
    det2 = Dataset()
    det2.ImagePositionPatient = det.ImagePositionPatient
    det2.ImageOrientationPatient = det.ImageOrientationPatient
    det2.CollimatorGridName = "MELP"
    det2.CollimatorType = "PARA"
    ds.DetectorInformationSequence = DicomSequence([det, det2])
    ds.NumberOfDetectors = 2
    rot = Dataset()
    rot.StartAngle = "0"
    rot.AngularStep = f"{360.0 / n_views / 1:.4g}"
    rot.RotationDirection = "CW"
    rot.ScanArc = "180"
    rot.ActualFrameDuration = int(round(view_duration_s * 1000))
    rot.NumberOfFramesInRotation = n_views
    ds.RotationInformationSequence = DicomSequence([rot])
    ds.NumberOfRotations = 1
    ew = Dataset()
    rng = Dataset()
    rng.EnergyWindowLowerLimit = "187.2"
    rng.EnergyWindowUpperLimit = "228.8"
    ew.EnergyWindowRangeSequence = DicomSequence([rng])
    ew.EnergyWindowName = "Lu177_208keV"
    ds.EnergyWindowInformationSequence = DicomSequence([ew])
    ds.NumberOfEnergyWindows = 1
    ds.RadiopharmaceuticalInformationSequence = DicomSequence(
        [_radiopharmaceutical(e.nuclide, e.pharmaceutical, e.route, e.injection, e.injected_bq / 1e6, pet=False)])
    ds.CorrectedImage = ["ATTN", "SCAT", "UNIF"]
    ds.ReconstructionMethod = "OSEM 4i10s CT-AC SC RR"
    vol = values[order]
    if storage in ("counts", "starguide"):
        q = np.clip(np.rint(vol), 0, 65535).astype(np.uint16)
        if float(vol.max()) > 65535:
            raise ValueError(f"SPECT counts overflow uint16 (max {vol.max():.0f}); lower the acquisition time")
    else:
        slope = float(bqml_slope) if bqml_slope is not None else float(f"{max(float(vol.max()), 1e-9) / 60000.0:.8g}")
        q = np.clip(np.rint(vol / slope), 0, 65535).astype(np.uint16)
        if storage in ("counts_scaled", "bqml_rescale", "bqml_rwv_rescale"):
            ds.RescaleSlope = f"{slope:.10g}"
            ds.RescaleIntercept = "0"
            ds.Units = "CNTS" if storage == "counts_scaled" else "BQML"
        if storage in ("bqml_rwv", "bqml_rwv_rescale"):
            rwv = Dataset()
            rwv.LUTLabel = "BQML"
            rwv.LUTExplanation = "Activity concentration"
            rwv.RealWorldValueFirstValueMapped = 0
            rwv.RealWorldValueLastValueMapped = 65535
            rwv.RealWorldValueIntercept = 0.0
            rwv.RealWorldValueSlope = slope
            unit = Dataset()
            unit.CodeValue = "Bq/ml"
            unit.CodingSchemeDesignator = "UCUM"
            unit.CodeMeaning = "becquerels/milliliter"
            rwv.MeasurementUnitsCodeSequence = DicomSequence([unit])
            ds.RealWorldValueMappingSequence = DicomSequence([rwv])
    if storage == "starguide":
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        ds.ManufacturerModelName = "StarGuide"
        for r in ds.RotationInformationSequence:
            del r.ActualFrameDuration
        ds.ImageComments = f"Q.Volumetrix$ImagingDuration${int(round(n_views * view_duration_s * 1000))}$"
        item = ds.RadiopharmaceuticalInformationSequence[0]
        for kw in ("RadionuclideTotalDose", "RadiopharmaceuticalStartTime", "RadiopharmaceuticalStartDateTime"):
            if kw in item:
                delattr(item, kw)
    _pixels(ds, q, signed=False)
    ds.save_as(out_dir / "IM00001", enforce_file_format=True)
    return ds


def write_mr(out_dir: Path, patient: PatientInfo, s: SeriesInfo, grid: Grid, signal: Array) -> list[Dataset]:
    out_dir.mkdir(parents=True, exist_ok=True)
    q = np.clip(np.rint(signal), 0, 32767).astype(np.int16)
    written = []
    for inst, k in enumerate(_slice_order(grid), start=1):
        ds = new_dataset(MR_STORAGE, uid(s.series_uid, "mr", k))
        _patient_study_series(ds, patient, s, "MR")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.InstanceNumber = inst
        ds.AcquisitionDate, ds.AcquisitionTime = _dt(s.series_datetime)
        _image_plane(ds, grid, k)
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.MagneticFieldStrength = "1.5"
        ds.RepetitionTime = "4.2"
        ds.EchoTime = "1.9"
        ds.FlipAngle = "10"
        _pixels(ds, q[k], signed=True)
        ds.save_as(out_dir / f"IM{inst:05d}", enforce_file_format=True)
        written.append(ds)
    return written


# ----------------------------------------------------------------------------- structure sets

@dataclass(frozen=True)
class RoiContours:
    name: str
    number: int
    interpreted_type: str  # ORGAN / GTV / AVOID ...
    color: tuple[int, int, int]
    contours: list[tuple[int, Array]]  # (referenced image index, Nx3 physical points)


def write_rtstruct(path: Path, patient: PatientInfo, s: SeriesInfo, images: Sequence[Dataset],
                   rois: Iterable[RoiContours], label: str = "Masks") -> Dataset:
    """RT Structure Set referencing ``images`` (the slices contours were drawn on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = new_dataset(RTSTRUCT_STORAGE, uid(s.series_uid, "rtstruct"))
    _patient_study_series(ds, patient, s, "RTSTRUCT")
    del ds.FrameOfReferenceUID, ds.PositionReferenceIndicator, ds.PatientPosition
    ds.InstanceNumber = 1
    ds.StructureSetLabel = label
    ds.StructureSetName = label
    ds.StructureSetDate, ds.StructureSetTime = _dt(s.series_datetime)
    frame_uid = images[0].FrameOfReferenceUID

    def img_ref(im: Dataset) -> Dataset:
        r = Dataset()
        r.ReferencedSOPClassUID = im.SOPClassUID
        r.ReferencedSOPInstanceUID = im.SOPInstanceUID
        return r

    ser = Dataset()
    ser.SeriesInstanceUID = images[0].SeriesInstanceUID
    ser.ContourImageSequence = DicomSequence([img_ref(im) for im in images])
    st = Dataset()
    st.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    st.ReferencedSOPInstanceUID = images[0].StudyInstanceUID
    st.RTReferencedSeriesSequence = DicomSequence([ser])
    fr = Dataset()
    fr.FrameOfReferenceUID = frame_uid
    fr.RTReferencedStudySequence = DicomSequence([st])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([fr])

    ss_rois, roi_contours, observations = [], [], []
    for roi in rois:
        it = Dataset()
        it.ROINumber = roi.number
        it.ReferencedFrameOfReferenceUID = frame_uid
        it.ROIName = roi.name
        it.ROIGenerationAlgorithm = "MANUAL"
        ss_rois.append(it)
        rc = Dataset()
        rc.ROIDisplayColor = list(roi.color)
        rc.ReferencedROINumber = roi.number
        seq = []
        for img_index, pts in roi.contours:
            c = Dataset()
            c.ContourImageSequence = DicomSequence([img_ref(images[img_index])])
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(pts)
            c.ContourData = [f"{v:.3f}" for v in pts.ravel()]
            seq.append(c)
        rc.ContourSequence = DicomSequence(seq)
        roi_contours.append(rc)
        ob = Dataset()
        ob.ObservationNumber = roi.number
        ob.ReferencedROINumber = roi.number
        ob.RTROIInterpretedType = roi.interpreted_type
        ob.ROIInterpreter = ""
        observations.append(ob)
    ds.StructureSetROISequence = DicomSequence(ss_rois)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_seg(path: Path, s: SeriesInfo, images: Sequence[Dataset], masks: dict[str, Array],
              categories: dict[str, tuple[object, object]]) -> Dataset:
    """Binary DICOM-SEG (highdicom) of ``masks`` ((z, y, x) on the grid of ``images``).

    ``images`` must be in the same slice order as the z axis of the masks.
    """
    import highdicom as hd

    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(masks)
    descriptions = []
    for n, name in enumerate(names, start=1):
        cat, typ = categories[name]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=n, segment_label=name, segmented_property_category=cat,
            segmented_property_type=typ, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL))
    stack = np.stack([masks[n].astype(np.uint8) for n in names], axis=-1)  # (z, y, x, segments)
    seg = hd.seg.Segmentation(
        source_images=list(images), pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=s.series_uid, series_number=s.series_number,
        sop_instance_uid=uid(s.series_uid, "seg"), instance_number=1, manufacturer="prrtquant phantom",
        manufacturer_model_name="synthetic", software_versions=__version__, device_serial_number="0",
        series_description=s.series_description,
    )
    seg.SeriesDate, seg.SeriesTime = _dt(s.series_datetime)
    seg.ContentDate, seg.ContentTime = _dt(s.series_datetime)
    seg.save_as(path, enforce_file_format=True)
    return seg
