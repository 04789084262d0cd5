"""Synthetic PRRT patients with known truth, exported as DICOM.

``generate_patient(out_dir, design=..., size=..., seed=...)`` writes one patient::

    out_dir/
      DICOM/...            the PACS-like export (layout "pacs" or "flat")
      truth.json           every true and reference-measured number (keys documented in
                           docs of :func:`generate_patient` and in test_data/README.md)
      sheet.json           what a site would put in the per-patient sheet (no identifiers)

The same seed gives the same anatomy, activities, poses, UIDs and pixel values.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..dicom.spect import decay_factor_during_acquisition
from ..dicom.write import uid
from ..geometry import Grid, Rigid
from ..io import atomic_directory
from ..radionuclides import GA68, LU177
from . import physics
from .anatomy import Anatomy, Deformation, build_anatomy, healthy_rois, iter_rois
from .contours import slice_contours
from .dicom_export import (
    EmissionInfo,
    PatientInfo,
    RoiContours,
    SeriesInfo,
    write_ct,
    write_mr,
    write_nm,
    write_pet,
    write_rtstruct,
    write_seg,
)

Design = Literal["whole_liver_ia", "lobar_ia"]
Size = Literal["tiny", "small", "clinical"]
SpectFormat = Literal["nm_counts", "nm_counts_scaled", "nm_bqml", "nm_bqml_rescale", "nm_bqml_rwv_rescale",
                      "nm_starguide", "pt_bqml"]
#: NM storage of each SPECT format (see :func:`prrtquant.phantom.dicom_export.write_nm`)
NM_STORAGE = {"nm_counts": "counts", "nm_counts_scaled": "counts_scaled", "nm_bqml": "bqml_rwv",
              "nm_bqml_rescale": "bqml_rescale", "nm_bqml_rwv_rescale": "bqml_rwv_rescale",
              "nm_starguide": "starguide"}


# --------------------------------------------------------------------------- sizes

@dataclass(frozen=True)
class SizeSpec:
    ct: tuple[tuple[int, int, int], tuple[float, float, float]]
    pet: tuple[tuple[int, int, int], tuple[float, float, float]]
    spect: tuple[tuple[int, int, int], tuple[float, float, float]]
    mr: tuple[tuple[int, int, int], tuple[float, float, float]]
    supersample: int
    contour_step_mm: float
    cycles: tuple[tuple[float, ...], ...]  # SPECT time points (h after injection) per cycle


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(ct=((72, 56, 45), (5.0, 5.0, 6.0)), pet=((60, 46, 44), (6.0, 6.0, 6.0)),
                     spect=((56, 44, 40), (6.4, 6.4, 6.4)), mr=((64, 50, 30), (5.5, 5.5, 6.0)),
                     supersample=3, contour_step_mm=0.5, cycles=((4.0, 24.0, 72.0, 168.0), (24.0,))),
    # the tiny anatomy's field of view at clinical voxel sizes (CT 2 mm, PET 4 mm, SPECT 4.42 mm): for
    # accuracy tests that must not depend on a few 6 mm voxels at a small lesion's edge
    "small": SizeSpec(ct=((180, 140, 135), (2.0, 2.0, 2.0)), pet=((90, 69, 66), (4.0, 4.0, 4.0)),
                      spect=((81, 64, 58), (4.42, 4.42, 4.42)), mr=((117, 92, 60), (3.0, 3.0, 3.0)),
                      supersample=2, contour_step_mm=0.5, cycles=((4.0, 24.0, 72.0, 168.0), (24.0,))),
    "clinical": SizeSpec(ct=((512, 512, 250), (0.977, 0.977, 2.0)), pet=((192, 192, 110), (3.65, 3.65, 3.27)),
                         spect=((128, 128, 110), (4.42, 4.42, 4.42)), mr=((256, 208, 60), (1.5, 1.5, 3.0)),
                         supersample=1, contour_step_mm=0.5,
                         cycles=((4.0, 24.0, 72.0, 168.0), (24.0,), (24.0,), (24.0,))),
}

PSF_FWHM_MM = {"PET": 6.0, "SPECT": 12.0}
#: Axial centre (reference frame z, mm) of each kind of scan's field of view.
FOV_CENTER_Z = {"CT": -5.0, "PET": -5.0, "SPECT": -2.0, "MR": 40.0}


def centered_grid(size: tuple[int, int, int], spacing: tuple[float, float, float], center: np.ndarray) -> Grid:
    origin = np.asarray(center, dtype=float) - (np.asarray(size) - 1) / 2.0 * np.asarray(spacing)
    return Grid(size=size, spacing=spacing, origin=tuple(float(v) for v in origin))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- options

@dataclass
class PhantomOptions:
    """Everything a generated patient depends on besides the seed.

    ``mean_er``: true mean enhancement ratio over the IA-enhanced target lesions (drawn from the
    seed when None). ``n_lesions``: liver target lesions (2–6; seed when None). ``noise``: relative
    noise level of the emission images (0 = noise free). ``deformation``: add a smooth liver
    deformation (up to ~6 mm) to every non-reference session. ``messy_names``: clinical ROI names
    in the RTSTRUCT and SEG instead of the canonical ones. ``spect_format``: counts in NM objects,
    Bq/mL in NM objects, or Bq/mL exported as PET objects. ``nm_negative_spacing``: NM frames from
    head to feet with a negative SpacingBetweenSlices. ``with_mr``: add an MR session with an
    RTSTRUCT of the target lesions drawn on it. ``layout``: "pacs" (DICOM/STnnn/SEnnn/IMnnnnn)
    or "flat" (one folder, random file names, plus a few non-DICOM files).

    ``emission_own_frame``: every PET and SPECT series gets its own FrameOfReferenceUID and its
    own scanner frame, related to its session CT's by a rigid offset (rotations up to
    ``emission_rotation_deg`` about each axis, 0.4× about x and y; a translation of
    ``emission_offset_mm`` in a random direction; drawn from a generator of their own, so the
    rest of the patient is unchanged); its grid is re-centred so that it still covers the same
    anatomy. Truth: ``sessions.{id}.emission``. ``spect_time_points``: SPECT hours after
    injection per cycle instead of the size's default (e.g. ``((24.0,),)`` for a quick patient
    with one SPECT). ``ct_slice_mm``: slice spacing (and thickness) of every CT instead of the
    size's (same axial extent; e.g. 2.0 for the tiny size, whose CT otherwise has 6 mm slices,
    so that contours drawn on the reference CT define small lesions' caps as a clinical CT does).
    These options are recorded in ``truth.json`` only when not at their defaults, so that
    existing patients regenerate identically.
    """

    design: Design = "whole_liver_ia"
    size: Size = "tiny"
    seed: int = 0
    pseudonym: str | None = None
    mean_er: float | None = None
    n_lesions: int | None = None
    n_extrahepatic: int | None = None
    treated_lobe: Literal["left", "right"] | None = None
    noise: float = 0.0
    deformation: bool = False
    messy_names: bool = False
    spect_format: SpectFormat = "nm_counts"
    nm_negative_spacing: bool = False
    with_mr: bool = False
    layout: Literal["pacs", "flat"] = "pacs"
    camera_cps_per_mbq: float = 9.6
    max_repositioning_mm: float = 15.0
    max_rotation_deg: float = 5.0
    emission_own_frame: bool = False
    emission_offset_mm: float = 30.0
    emission_rotation_deg: float = 4.0
    spect_time_points: tuple[tuple[float, ...], ...] | None = None
    ct_slice_mm: float | None = None


#: Options written to truth.json only when they differ from these defaults (added after the
#: bundled cohort was made: its truth must regenerate identically).
LATE_OPTION_DEFAULTS: dict[str, Any] = {"emission_own_frame": False, "emission_offset_mm": 30.0,
                                        "emission_rotation_deg": 4.0, "spect_time_points": None,
                                        "ct_slice_mm": None}


# --------------------------------------------------------------------------- names

MESSY_NAMES = {
    "liver": "Liver", "liver_left": "Lt lobe", "liver_right": "Rt lobe", "kidney_left": "Kidney L",
    "kidney_right": "Kidney R", "spleen": "SPLEEN", "bone_marrow": "L2-L4 marrow",
}


def display_name(roi: str, messy: bool) -> str:
    if not messy:
        return roi
    if roi.startswith("lesion_"):
        return f"Target {roi.split('_')[1]}"
    if roi.startswith("extrahepatic_"):
        return f"Extrahep met {roi.split('_')[1]}"
    return MESSY_NAMES[roi]


FIRST_NAMES = ["Jane", "John", "Maria", "Pierre", "Anna", "Lars", "Sofia", "Henk", "Claire", "Ahmed"]
LAST_NAMES = ["Doe", "Dupont", "Jansen", "Moreau", "Svensson", "Bakker", "Rossi", "Garcia", "Lefebvre", "Novak"]


# --------------------------------------------------------------------------- sessions

@dataclass
class Session:
    id: str
    kind: Literal["PET", "SPECT", "MR"]
    acquisition: dt.datetime
    pose: Rigid
    ct_grid: Grid | None
    em_grid: Grid
    route: str | None = None
    cycle: int | None = None
    hours_pi: float | None = None
    injection: dt.datetime | None = None
    injected_bq: float | None = None
    is_reference: bool = False
    deformation: Deformation | None = None
    series: dict[str, SeriesInfo] = field(default_factory=dict)
    #: emission scanner frame → reference frame when the emission has its own frame (else ``pose``)
    em_pose: Rigid | None = None
    #: emission scanner frame → session CT frame when the emission has its own frame
    em_to_ct: Rigid | None = None

    @property
    def emission_pose(self) -> Rigid:
        return self.em_pose if self.em_pose is not None else self.pose


def _plan_sessions(opt: PhantomOptions, spec: SizeSpec, rng: np.random.Generator, anat: Anatomy) -> list[Session]:
    base = dt.datetime(2024, 1, 8, 0, 0) + dt.timedelta(days=int(rng.integers(0, 500)))

    def at(day: int, hh: int, mm: int) -> dt.datetime:
        return base + dt.timedelta(days=day, hours=hh, minutes=mm, seconds=int(rng.integers(0, 60)))

    def pose(ref: bool) -> Rigid:
        if ref:
            return Rigid()
        a = rng.uniform(-1, 1, 3) * np.array([0.4, 0.4, 1.0]) * opt.max_rotation_deg
        t = rng.uniform(-1, 1, 3) * opt.max_repositioning_mm
        return Rigid(tuple(float(v) for v in a), tuple(float(v) for v in t), (0.0, 5.0, 0.0))  # type: ignore[arg-type]

    def grid_for(kind: str, p: Rigid, key: str) -> Grid:
        size, sp = getattr(spec, key)
        # the scanner centres its field of view on the patient's abdomen: the reference point
        # (0, 5, z_fov) seen from this session's scanner frame, plus a little table jitter
        c_ref = np.array([0.0, 5.0, FOV_CENTER_Z[kind]])
        c = p.inverse_apply(c_ref[None, :])[0] + rng.uniform(-4, 4, 3) * np.array([1, 1, 1.5])
        c = np.round(c / 0.5) * 0.5
        return centered_grid(size, sp, c)

    def deform(ref: bool) -> Deformation | None:
        if ref or not opt.deformation:
            return None
        amp = rng.uniform(-1, 1, 3) * np.array([3.0, 3.0, 5.0])
        return Deformation(tuple(anat.meta["liver_center_mm"]), 45.0, tuple(float(v) for v in amp))  # type: ignore[arg-type]

    sessions: list[Session] = []
    inj_iv = at(0, 9, int(rng.integers(0, 40)))
    acq_iv = inj_iv + dt.timedelta(minutes=float(rng.uniform(52, 68)))
    p = pose(True)
    sessions.append(Session("pet_iv", "PET", acq_iv, p, grid_for("CT", p, "ct"), grid_for("PET", p, "pet"),
                            route="IV", injection=inj_iv, injected_bq=float(rng.uniform(130, 170)) * 1e6,
                            is_reference=True))
    inj_ia = at(7, 13, int(rng.integers(0, 40)))
    acq_ia = inj_ia + dt.timedelta(minutes=float(rng.uniform(50, 65)))
    p = pose(False)
    sessions.append(Session("pet_ia", "PET", acq_ia, p, grid_for("CT", p, "ct"), grid_for("PET", p, "pet"),
                            route="IA", injection=inj_ia, injected_bq=float(rng.uniform(100, 140)) * 1e6,
                            deformation=deform(False)))
    cycles = spec.cycles if opt.spect_time_points is None else tuple(tuple(c) for c in opt.spect_time_points)
    routes = _cycle_routes(opt.design, len(cycles))
    for c, tps in enumerate(cycles, start=1):
        inj = at(28 + 56 * (c - 1), 10, int(rng.integers(0, 50)))
        a_inj = float(rng.uniform(7.2, 7.6)) * 1e9
        for h in tps:
            acq = inj + dt.timedelta(hours=h, minutes=float(rng.uniform(-20, 20)))
            p = pose(False)
            sessions.append(Session(f"spect_c{c}_{int(h)}h", "SPECT", acq, p, grid_for("CT", p, "ct"),
                                    grid_for("SPECT", p, "spect"), route=routes[c - 1], cycle=c, hours_pi=h,
                                    injection=inj, injected_bq=a_inj, deformation=deform(False)))
    if opt.with_mr:
        p = pose(False)
        sessions.append(Session("mr", "MR", at(-10, 11, 0), p, None, grid_for("MR", p, "mr"),
                                deformation=deform(False)))
    return sessions


def rigid_from_matrix(m: np.ndarray, center: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Rigid:
    """The :class:`Rigid` (Euler angles about ``center``) of a 4×4 rigid matrix."""
    e = sitk.Euler3DTransform()
    e.SetCenter([float(v) for v in center])
    e.SetMatrix([float(v) for v in np.asarray(m)[:3, :3].ravel()])
    c = np.asarray(center, dtype=float)
    t = np.asarray(m)[:3, :3] @ c + np.asarray(m)[:3, 3] - c
    out = Rigid(tuple(float(math.degrees(a)) for a in (e.GetAngleX(), e.GetAngleY(), e.GetAngleZ())),  # type: ignore[arg-type]
                tuple(float(v) for v in t), tuple(float(v) for v in center))  # type: ignore[arg-type]
    if not np.allclose(out.matrix, m, atol=1e-9):
        raise ValueError("not a rigid matrix")
    return out


def _emission_frames(opt: PhantomOptions, sessions: list[Session]) -> None:
    """Give every PET/SPECT its own scanner frame (``emission_own_frame``), from a generator of its own."""
    if not opt.emission_own_frame:
        return
    rng = np.random.default_rng([opt.seed, 20240108])
    for s in sessions:
        if s.kind not in ("PET", "SPECT"):
            continue
        a = rng.uniform(-1, 1, 3) * np.array([0.4, 0.4, 1.0]) * opt.emission_rotation_deg
        d = rng.normal(size=3)
        t = d / np.linalg.norm(d) * opt.emission_offset_mm
        centre = tuple(float(v) for v in np.asarray(s.em_grid.origin)
                       + (np.asarray(s.em_grid.size) - 1) / 2.0 * np.asarray(s.em_grid.spacing))
        o = Rigid(tuple(float(v) for v in a), tuple(float(v) for v in t), centre)  # type: ignore[arg-type]
        s.em_to_ct = o
        s.em_pose = rigid_from_matrix(s.pose.matrix @ o.matrix, (0.0, 5.0, 0.0))
        # the same anatomy in the field of view, in the emission's own coordinates
        s.em_grid = centered_grid(s.em_grid.size, s.em_grid.spacing, o.inverse_apply(np.asarray(centre)[None, :])[0])


def _cycle_routes(design: str, n: int) -> list[str]:
    """Route of each 177Lu cycle: LUTIA-like lobar IA every cycle; Bordeaux-like IV then IA."""
    if design == "lobar_ia":
        return ["IA"] * n
    return ["IV"] + ["IA"] * (n - 1)


# --------------------------------------------------------------------------- activities

def _activities(opt: PhantomOptions, anat: Anatomy, rng: np.random.Generator) -> dict[str, Any]:
    """Per-region SUVs for both PET sessions and 177Lu kinetics per cycle route."""
    lesions = anat.lesions
    treated = opt.treated_lobe or ("right" if rng.random() < 0.6 else "left")
    enhanced = [l for l in lesions if opt.design == "whole_liver_ia" or anat.lesion_lobe[l] == treated]
    mean_er = opt.mean_er if opt.mean_er is not None else float(rng.uniform(2.0, 5.0))
    w = np.exp(rng.normal(0.0, 0.22, len(enhanced)))
    er = {l: float(mean_er * wi / w.mean()) for l, wi in zip(enhanced, w)}

    jitter = {t: float(np.exp(rng.normal(0, 0.08))) for t in physics.SUV_IV}
    suv_iv: dict[str, float] = {}
    for r in anat.regions:
        base = physics.SUV_IV[r.tissue] * jitter[r.tissue]
        if r.tissue in ("lesion", "extrahepatic"):
            base = physics.SUV_IV[r.tissue] * float(np.exp(rng.normal(0, 0.3)))
        suv_iv[r.name] = base
    suv_ia: dict[str, float] = {}
    for r in anat.regions:
        if r.name in er:
            ratio = er[r.name]
        elif r.name == "liver_left_parenchyma" and (opt.design == "whole_liver_ia" or treated == "left"):
            ratio = physics.IA_RATIO_TREATED_LIVER
        elif r.name == "liver_right_parenchyma" and (opt.design == "whole_liver_ia" or treated == "right"):
            ratio = physics.IA_RATIO_TREATED_LIVER
        else:
            ratio = physics.IA_RATIO_SYSTEMIC
        suv_ia[r.name] = suv_iv[r.name] * ratio

    kin_iv: dict[str, physics.Kinetics] = {}
    for r in anat.regions:
        k = physics.LU_KINETICS_IV[r.tissue]
        if r.tissue in ("lesion", "extrahepatic"):
            k = k.scaled(float(np.exp(rng.normal(0, 0.3))))
        kin_iv[r.name] = k
    # IA 177Lu cycle gain per region (generator assumption: lesions gain sqrt of their 68Ga ER)
    gain_ia: dict[str, float] = {}
    for r in anat.regions:
        if r.name in er:
            gain_ia[r.name] = math.sqrt(er[r.name])
        elif r.tissue == "lesion":
            gain_ia[r.name] = physics.IA_RATIO_SYSTEMIC
        elif r.name in ("liver_left_parenchyma", "liver_right_parenchyma"):
            lobe = "left" if "left" in r.name else "right"
            gain_ia[r.name] = 1.1 if (opt.design == "whole_liver_ia" or lobe == treated) else physics.IA_RATIO_SYSTEMIC
        else:
            gain_ia[r.name] = physics.IA_RATIO_SYSTEMIC
    return {"treated_lobe": treated if opt.design == "lobar_ia" else None, "er": er, "mean_er": mean_er,
            "suv": {"IV": suv_iv, "IA": suv_ia}, "kin_iv": kin_iv, "gain_ia": gain_ia}


def _kinetics(acts: dict[str, Any], route: str) -> dict[str, physics.Kinetics]:
    kin: dict[str, physics.Kinetics] = acts["kin_iv"]
    if route == "IV":
        return dict(kin)
    return {n: k.scaled(acts["gain_ia"][n]) for n, k in kin.items()}


# --------------------------------------------------------------------------- main entry

def generate_patient(out_dir: str | Path, design: Design = "whole_liver_ia", size: Size = "tiny", seed: int = 0,
                     **kwargs: Any) -> dict[str, Any]:
    """Write one synthetic patient to ``out_dir`` and return its truth (also in truth.json).

    Keyword arguments are the fields of :class:`PhantomOptions`. The directory is built under a
    temporary name next to ``out_dir`` and renamed at the end: a failure leaves nothing behind.
    """
    opt = PhantomOptions(design=design, size=size, seed=seed, **kwargs)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: output directory exists and is not empty")
    with atomic_directory(out) as tmp:
        truth = _generate(tmp, opt)
    return truth


def patient_anatomy(opt: PhantomOptions, rng: np.random.Generator | None = None) -> Anatomy:
    """The anatomy of the patient ``opt`` describes (the first draws from the seed's generator)."""
    rng = rng if rng is not None else np.random.default_rng(opt.seed)
    n_les = opt.n_lesions if opt.n_lesions is not None else int(rng.integers(3, 6))
    if not 2 <= n_les <= 6:
        raise ValueError("n_lesions must be between 2 and 6")
    n_extra = opt.n_extrahepatic if opt.n_extrahepatic is not None else int(rng.integers(1, 3))
    return build_anatomy(rng, n_les, n_extra,
                         min_lesions_per_lobe=2 if opt.design == "lobar_ia" and n_les >= 4 else 1)


def _size_spec(opt: PhantomOptions) -> SizeSpec:
    """The size's grids, with the CT's slices at ``opt.ct_slice_mm`` when asked (same axial extent)."""
    spec = SIZES[opt.size]
    if opt.ct_slice_mm is None:
        return spec
    if not 0.5 <= opt.ct_slice_mm <= 10.0:
        raise ValueError(f"ct_slice_mm must be between 0.5 and 10 mm, got {opt.ct_slice_mm}")
    (nx, ny, nz), (sx, sy, sz) = spec.ct
    n_new = int(round((nz - 1) * sz / opt.ct_slice_mm)) + 1
    return dataclasses.replace(spec, ct=((nx, ny, n_new), (sx, sy, float(opt.ct_slice_mm))))


def _generate(out: Path, opt: PhantomOptions) -> dict[str, Any]:
    if opt.design not in ("whole_liver_ia", "lobar_ia"):
        raise ValueError(f"unknown design {opt.design!r}")
    if opt.size not in SIZES:
        raise ValueError(f"unknown size {opt.size!r}")
    spec = _size_spec(opt)
    rng = np.random.default_rng(opt.seed)
    anat = patient_anatomy(opt, rng)
    acts = _activities(opt, anat, rng)
    sessions = _plan_sessions(opt, spec, rng, anat)
    _emission_frames(opt, sessions)

    sex = "F" if rng.random() < 0.5 else "M"
    weight = float(np.round(rng.uniform(55, 95), 1))
    height = float(np.round(rng.uniform(1.55, 1.92), 2))
    birth = dt.date(1945, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 35)))
    patient = PatientInfo(name=f"{LAST_NAMES[int(rng.integers(0, 10))]}^{FIRST_NAMES[int(rng.integers(0, 10))]}",
                          patient_id=f"H{int(rng.integers(1e6, 1e7))}", birth_date=birth.strftime("%Y%m%d"),
                          sex=sex, weight_kg=weight, height_m=height)
    pseudonym = opt.pseudonym or f"SYN{opt.seed:04d}"

    dicom_root = out / "DICOM"
    series_no = 0

    def series_dir(study_idx: int, series_idx: int) -> Path:
        return dicom_root / f"ST{study_idx:03d}" / f"SE{series_idx:03d}"  # "flat" is made at the end

    session_truth: dict[str, Any] = {}
    ref = next(s for s in sessions if s.is_reference)
    ref_ct_datasets = None
    noise_rng = np.random.default_rng(opt.seed + 1_000_003)
    vol = anat.region_volumes_ml
    volumes = {roi: sum(vol[m] for m in anat.rois[roi]) for roi in anat.rois}
    volumes.update({k: sum(vol[m] for m in v) for k, v in healthy_rois(anat).items()})
    weight_g = weight * 1000.0

    for si, s in enumerate(sessions):
        study_uid = uid(opt.seed, pseudonym, s.id, "study")
        frame_uid = uid(opt.seed, pseudonym, s.id, "frame")

        def info(mod: str, desc: str) -> SeriesInfo:
            nonlocal series_no
            series_no += 1
            return SeriesInfo(study_uid=study_uid, series_uid=uid(opt.seed, pseudonym, s.id, mod),
                              frame_of_reference_uid=frame_uid, study_datetime=s.acquisition - dt.timedelta(minutes=5),
                              series_datetime=s.acquisition, series_number=series_no, series_description=desc,
                              study_description={"PET": "PET/CT 68Ga-DOTATATE", "SPECT": "SPECT/CT 177Lu",
                                                 "MR": "MR liver"}[s.kind],
                              accession=f"A{int(noise_rng.integers(1e7, 1e8))}", study_id=str(si + 1))

        st: dict[str, Any] = {"kind": s.kind, "acquisition_datetime": s.acquisition.isoformat(),
                              "session_to_reference": s.pose.matrix.tolist(),
                              "pose": {"angles_deg": list(s.pose.angles_deg), "translation_mm": list(s.pose.translation),
                                       "center_mm": list(s.pose.center)},
                              "deformation": s.deformation.to_dict() if s.deformation else None,
                              "is_reference": s.is_reference, "study_instance_uid": study_uid,
                              "frame_of_reference_uid": frame_uid}
        # ---- CT
        if s.ct_grid is not None:
            ct_info = info("CT", "CT " + ("PET AC" if s.kind == "PET" else "SPECT AC"))
            labels_ct = anat.label_grid(s.ct_grid, s.pose, s.deformation)
            hu_lut = physics.lut(anat, {r.name: physics.HU[r.tissue] for r in anat.regions}, physics.HU["air"])
            hu = hu_lut.astype(np.float32)[labels_ct]
            hu += 6.0 * noise_rng.standard_normal(hu.shape, dtype=np.float32)
            d = series_dir(si, 1)
            ds_ct = write_ct(d, patient, ct_info, s.ct_grid, hu)
            st["ct"] = {"series_instance_uid": ct_info.series_uid, "grid": s.ct_grid.to_dict()}
            if s.is_reference:
                ref_ct_datasets = ds_ct
        # ---- emission / MR
        if s.em_to_ct is not None:
            assert s.em_pose is not None
            em_frame = uid(opt.seed, pseudonym, s.id, "frame", "emission")
            st["emission"] = {"frame_of_reference_uid": em_frame,
                              "session_to_reference": s.em_pose.matrix.tolist(),
                              "pose": {"angles_deg": list(s.em_pose.angles_deg),
                                       "translation_mm": list(s.em_pose.translation),
                                       "center_mm": list(s.em_pose.center)},
                              "emission_to_ct": s.em_to_ct.matrix.tolist()}
        if s.kind == "PET":
            e_info = info("PT", f"PET {s.route} WB AC")
            if s.em_to_ct is not None:
                e_info = dataclasses.replace(e_info, frame_of_reference_uid=em_frame)
            st.update(_pet_session(s, e_info, anat, acts, opt, spec, patient, series_dir(si, 2), noise_rng,
                                   weight_g))
        elif s.kind == "SPECT":
            e_info = info("NM" if opt.spect_format != "pt_bqml" else "PT", f"SPECT Lu177 C{s.cycle} {int(s.hours_pi or 0)}h")
            if s.em_to_ct is not None:
                e_info = dataclasses.replace(e_info, frame_of_reference_uid=em_frame)
            st.update(_spect_session(s, e_info, anat, acts, opt, spec, patient, series_dir(si, 2), noise_rng,
                                     weight_g))
        else:
            mr_info = info("MR", "T1 vibe HBP tra")
            labels = anat.label_grid(s.em_grid, s.pose, s.deformation)
            sig = physics.lut(anat, {r.name: physics.MR_SIGNAL[r.tissue] for r in anat.regions})[labels]
            sig = sig * (1.0 + noise_rng.normal(0.0, 0.02, sig.shape))
            mr_ds = write_mr(series_dir(si, 1), patient, mr_info, s.em_grid, sig)
            st["mr"] = {"series_instance_uid": mr_info.series_uid, "grid": s.em_grid.to_dict()}
            rs_info = info("RTSTRUCT_MR", "Target lesions (MR)")
            rois = _contour_rois(anat, anat.lesions, s.em_grid, s.pose, s.deformation, opt.messy_names,
                                 spec.contour_step_mm)
            write_rtstruct(series_dir(si, 2) / "IM00001", patient, rs_info, _by_slice(mr_ds, s.em_grid), rois,
                           label="Targets MR")
            st["rtstruct"] = {"series_instance_uid": rs_info.series_uid, "rois": anat.lesions}
        session_truth[s.id] = st

        # ---- masks on the reference CT
        if s.is_reference:
            assert ref_ct_datasets is not None and s.ct_grid is not None
            ct_slices = _by_slice(ref_ct_datasets, s.ct_grid)
            roi_names = list(iter_rois(anat))
            rs_info = info("RTSTRUCT", "Masks (RTSTRUCT)")
            rois = _contour_rois(anat, roi_names, s.ct_grid, None, None, opt.messy_names, spec.contour_step_mm)
            write_rtstruct(series_dir(si, 3) / "IM00001", patient, rs_info, ct_slices, rois)
            seg_info = info("SEG", "Masks (SEG)")
            labels_ref = anat.label_grid(s.ct_grid)
            masks = {display_name(r, opt.messy_names): anat.roi_mask(labels_ref, r) for r in roi_names}
            cats = {display_name(r, opt.messy_names): _seg_codes(r) for r in roi_names}
            write_seg(series_dir(si, 4) / "IM00001", seg_info, ct_slices, masks, cats)
            st["masks"] = {"rtstruct_series_instance_uid": rs_info.series_uid,
                           "seg_series_instance_uid": seg_info.series_uid,
                           "roi_names": {r: display_name(r, opt.messy_names) for r in roi_names},
                           "voxels_on_reference_ct": {r: int(m.sum()) for r, m in zip(roi_names, masks.values())}}

    if opt.layout == "flat":
        _flatten(dicom_root, noise_rng)
    truth = _truth(opt, anat, acts, sessions, session_truth, volumes, patient, pseudonym, weight_g, ref)
    (out / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=False))
    sheet = _sheet(opt, acts, sessions, session_truth, pseudonym)
    if opt.spect_format == "nm_starguide":  # what the headers lack goes in the SPECT sheet, as a site would do
        rows = [(v["spect"]["series_instance_uid"], v["injection_datetime"], f"{v['injected_activity_bq'] / 1e6:.6g}")
                for v in session_truth.values() if "spect" in v]
        (out / "spect_sheet.tsv").write_text("series_instance_uid\tinjection_datetime\tinjected_activity_mbq\n"
                                             + "".join("\t".join(r) + "\n" for r in rows))
        sheet["spect_sheet"] = "spect_sheet.tsv"
    (out / "sheet.json").write_text(json.dumps(sheet, indent=1))
    return truth


def _by_slice(datasets: list[Any], grid: Grid) -> list[Any]:
    """Datasets ordered by slice index k (writers number instances from the top)."""
    nz = grid.size[2]
    by_k = [None] * nz
    for inst, ds in enumerate(datasets, start=1):
        by_k[nz - inst] = ds
    return by_k


def _seg_codes(roi: str) -> tuple[object, object]:
    from pydicom.sr.codedict import codes

    if roi.startswith("lesion_") or roi.startswith("extrahepatic_"):
        return codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm
    typ = {"liver": codes.SCT.Liver, "liver_left": codes.SCT.Liver, "liver_right": codes.SCT.Liver,
           "kidney_left": codes.SCT.Kidney, "kidney_right": codes.SCT.Kidney, "spleen": codes.SCT.Spleen,
           "bone_marrow": codes.SCT.BoneMarrow}[roi]
    return codes.SCT.AnatomicalStructure, typ


ROI_COLORS = {"liver": (170, 110, 60), "liver_left": (230, 160, 60), "liver_right": (140, 80, 30),
              "kidney_left": (60, 180, 60), "kidney_right": (30, 130, 30), "spleen": (150, 60, 200),
              "bone_marrow": (240, 240, 120)}


def _contour_rois(anat: Anatomy, names: list[str], grid: Grid, pose: Rigid | None, deformation: Deformation | None,
                  messy: bool, step_mm: float) -> list[RoiContours]:
    out = []
    for n, roi in enumerate(names, start=1):
        shape = anat.roi_shape(roi)
        contours = []
        for k in range(grid.size[2]):
            for pts in slice_contours(shape, grid, k, pose, deformation, step_mm=step_mm):
                contours.append((k, pts))
        lesion = roi.startswith(("lesion_", "extrahepatic_"))
        out.append(RoiContours(display_name(roi, messy), n, "GTV" if lesion else "ORGAN",
                               ROI_COLORS.get(roi, (230, 40, 40) if roi.startswith("lesion_") else (240, 120, 200)),
                               contours))
    return out


def _exact_masks(anat: Anatomy, labels: np.ndarray) -> dict[str, np.ndarray]:
    masks = {r: anat.roi_mask(labels, r) for r in anat.rois}
    for k, members in healthy_rois(anat).items():
        masks[k] = np.isin(labels, [anat.by_name[m].label for m in members])
    return masks


def _noisy(vals: np.ndarray, ref_level: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    if cv <= 0:
        return vals
    sd = cv * np.sqrt(np.clip(vals, 0, None) * ref_level)
    return np.clip(vals + rng.normal(0.0, 1.0, vals.shape) * sd, 0, None)


def _pet_session(s: Session, e_info: SeriesInfo, anat: Anatomy, acts: dict[str, Any], opt: PhantomOptions,
                 spec: SizeSpec, patient: PatientInfo, d: Path, rng: np.random.Generator, weight_g: float) -> dict[str, Any]:
    assert s.injection is not None and s.injected_bq is not None and s.route is not None
    suv = acts["suv"][s.route]
    decay = math.exp(-GA68.decay_constant_per_s * (s.acquisition - s.injection).total_seconds())
    suv_to_bqml = s.injected_bq * decay / weight_g
    bq = physics.emission_image(anat, s.em_grid, physics.lut(anat, suv) * suv_to_bqml, PSF_FWHM_MM["PET"],
                                spec.supersample, s.emission_pose, s.deformation)
    liver_level = suv["liver_left_parenchyma"] * suv_to_bqml
    bq = _noisy(bq, liver_level, opt.noise, rng)
    e = EmissionInfo(GA68, "Ga-68 DOTATATE", "Intravenous" if s.route == "IV" else "Intra-arterial",
                     s.injection, s.injected_bq, frame_duration_s=180.0)
    _, stored = write_pet(d, patient, e_info, s.em_grid, bq, e, bed_slices=max(1, s.em_grid.size[2] // 2))
    labels = anat.label_grid(s.em_grid, s.emission_pose, s.deformation)
    masks = _exact_masks(anat, labels)
    suv_img = stored / suv_to_bqml
    ref = {r: {"suvmean": float(suv_img[m].mean()), "suvmax": float(suv_img[m].max()),
               "bqml_mean": float(stored[m].mean()), "voxels": int(m.sum())} for r, m in masks.items() if m.any()}
    true_suv = {r: _roi_mean(anat, r, suv, anat.region_volumes_ml) for r in masks}
    true = {r: {"suv": v, "bqml": v * suv_to_bqml} for r, v in true_suv.items()}
    return {"route": s.route, "radionuclide": "Ga-68", "injection_datetime": s.injection.isoformat(),
            "injected_activity_bq": s.injected_bq, "suv_bw_factor_ml_per_bq": weight_g / (s.injected_bq * decay),
            "decay_factor_injection_to_series": decay,
            "pet": {"series_instance_uid": e_info.series_uid, "grid": s.em_grid.to_dict(), "units": "BQML",
                    "decay_correction": "START", "psf_fwhm_mm": PSF_FWHM_MM["PET"]},
            "true": true, "reference_measured": ref}


def _members(anat: Anatomy, roi: str) -> list[str]:
    hr = healthy_rois(anat)
    return hr[roi] if roi in hr else anat.rois[roi]


def _roi_mean(anat: Anatomy, roi: str, value: dict[str, float], vols: dict[str, float]) -> float:
    mem = _members(anat, roi)
    v = np.array([vols[m] for m in mem])
    x = np.array([value[m] for m in mem])
    return float((v * x).sum() / v.sum())


def _spect_session(s: Session, e_info: SeriesInfo, anat: Anatomy, acts: dict[str, Any], opt: PhantomOptions,
                   spec: SizeSpec, patient: PatientInfo, d: Path, rng: np.random.Generator,
                   weight_g: float) -> dict[str, Any]:
    assert s.injection is not None and s.injected_bq is not None and s.route is not None
    kin = _kinetics(acts, s.route)
    t_h = (s.acquisition - s.injection).total_seconds() / 3600.0
    lam_h = LU177.decay_constant_per_s * 3600.0
    conc = {n: float(k.concentration(t_h, s.injected_bq, weight_g, lam_h)) for n, k in kin.items()}
    bq = physics.emission_image(anat, s.em_grid, physics.lut(anat, conc), PSF_FWHM_MM["SPECT"], spec.supersample,
                                s.emission_pose, s.deformation)
    bq = _noisy(bq, conc["liver_left_parenchyma"], opt.noise, rng)
    n_views, view_s = 60, 20.0
    duration_s = n_views * view_s
    vvox = s.em_grid.voxel_volume_ml
    counts_per_bqml = vvox * 1e-6 * opt.camera_cps_per_mbq * duration_s
    e = EmissionInfo(LU177, "Lu-177 DOTATATE", "Intravenous" if s.route == "IV" else "Intra-arterial",
                     s.injection, s.injected_bq, frame_duration_s=duration_s)
    # an acquisition that is not decay corrected records the mean over its duration: f × the value at its start
    f = decay_factor_during_acquisition(LU177.decay_constant_per_s, duration_s)
    storage = NM_STORAGE.get(opt.spect_format)
    if storage in ("counts", "starguide"):
        write_nm(d, patient, e_info, s.em_grid, bq * f * counts_per_bqml, e, "CNTS", n_views, view_s,
                 opt.nm_negative_spacing, storage=storage)
        stored = np.rint(bq * f * counts_per_bqml) / counts_per_bqml / f
        units = "CNTS"
    elif storage == "counts_scaled":
        counts = bq * f * counts_per_bqml
        slope = float(f"{counts.max() / 60000.0:.8g}")
        write_nm(d, patient, e_info, s.em_grid, counts, e, "CNTS", n_views, view_s, opt.nm_negative_spacing, slope,
                 storage=storage)
        stored = np.rint(counts / slope) * slope / counts_per_bqml / f
        units = "CNTS"
    elif storage is not None:
        slope = float(f"{bq.max() * f / 60000.0:.8g}")
        write_nm(d, patient, e_info, s.em_grid, bq * f, e, "BQML", n_views, view_s, opt.nm_negative_spacing, slope,
                 storage=storage)
        stored = np.rint(bq * f / slope) * slope / f
        units = "BQML"
    else:
        _, stored = write_pet(d, patient, e_info, s.em_grid, bq * f, e, decay_correction="NONE")
        stored = stored / f
        units = "BQML"
    labels = anat.label_grid(s.em_grid, s.emission_pose, s.deformation)
    masks = _exact_masks(anat, labels)
    ref = {r: {"bqml_mean": float(stored[m].mean()), "bqml_max": float(stored[m].max()),
               "activity_mbq": float(stored[m].sum() * vvox / 1e6), "voxels": int(m.sum())}
           for r, m in masks.items() if m.any()}
    vols = anat.region_volumes_ml
    true = {r: {"bqml": _roi_mean(anat, r, conc, vols),
                "activity_mbq": sum(conc[m] * vols[m] for m in _members(anat, r)) / 1e6} for r in masks}
    return {"route": s.route, "cycle": s.cycle, "nominal_hours_pi": s.hours_pi, "hours_pi": t_h,
            "radionuclide": "Lu-177", "injection_datetime": s.injection.isoformat(),
            "injected_activity_bq": s.injected_bq,
            "spect": {"series_instance_uid": e_info.series_uid, "grid": s.em_grid.to_dict(), "units": units,
                      "format": opt.spect_format, "negative_spacing": opt.nm_negative_spacing,
                      "acquisition_duration_s": duration_s, "camera_cps_per_mbq": opt.camera_cps_per_mbq,
                      "counts_per_bqml_voxel": counts_per_bqml if units == "CNTS" else None,
                      "decay_correction": "NONE", "psf_fwhm_mm": PSF_FWHM_MM["SPECT"]},
            "true": true, "reference_measured": ref}


def _flatten(root: Path, rng: np.random.Generator) -> None:
    """Move every file to ``root`` under a random hex name; add a few non-DICOM files."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        name = "".join(rng.choice(list("0123456789abcdef"), 16)) + ".dcm"
        os.replace(p, root / name)
    for p in sorted((q for q in root.rglob("*") if q.is_dir()), key=lambda q: -len(q.parts)):
        p.rmdir()
    (root / "README.txt").write_text("Exported from PACS\n")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(16))


# --------------------------------------------------------------------------- truth

def _truth(opt: PhantomOptions, anat: Anatomy, acts: dict[str, Any], sessions: list[Session], st: dict[str, Any],
           volumes: dict[str, float], patient: PatientInfo, pseudonym: str, weight_g: float,
           ref: Session) -> dict[str, Any]:
    lesions = anat.lesions
    er_true = {l: acts["suv"]["IA"][l] / acts["suv"]["IV"][l] for l in lesions}
    targets = lesions if opt.design == "whole_liver_ia" else [l for l in lesions if anat.lesion_lobe[l] == acts["treated_lobe"]]
    iv, ia = st["pet_iv"]["reference_measured"], st["pet_ia"]["reference_measured"]
    er_ref = {l: {"er_mean": ia[l]["suvmean"] / iv[l]["suvmean"], "er_max": ia[l]["suvmax"] / iv[l]["suvmax"]}
              for l in lesions}
    threshold = 3.0

    def summary(values: list[float]) -> dict[str, Any]:
        m = float(np.mean(values))
        return {"mean": m, "eligible": bool(m >= threshold)}

    lam_h = LU177.decay_constant_per_s * 3600.0
    cycles: dict[str, Any] = {}
    for s in sessions:
        if s.kind != "SPECT" or str(s.cycle) in cycles:
            continue
        kin = _kinetics(acts, s.route or "IV")
        tia_density = {n: k.tia_density(s.injected_bq or 0.0, weight_g, lam_h) for n, k in kin.items()}
        vols = anat.region_volumes_ml
        tia = {r: sum(tia_density[m] * vols[m] for m in _members(anat, r)) / 1e6
               for r in list(anat.rois) + list(healthy_rois(anat))}
        cycles[str(s.cycle)] = {
            "route": s.route, "injection_datetime": s.injection.isoformat() if s.injection else None,
            "injected_activity_bq": s.injected_bq,
            "kinetics": {n: k.to_dict() for n, k in kin.items()},
            "tia_mbq_h": tia,
            "residence_time_h": {r: v / ((s.injected_bq or 1.0) / 1e6) for r, v in tia.items()},
            "time_points": [x.id for x in sessions if x.kind == "SPECT" and x.cycle == s.cycle],
        }

    tn: dict[str, Any] = {}
    for s in sessions:
        if s.kind != "SPECT":
            continue
        meas, tr = st[s.id]["reference_measured"], st[s.id]["true"]
        row: dict[str, Any] = {}
        for lobe in ("left", "right"):
            les = [l for l in lesions if anat.lesion_lobe[l] == lobe]
            n_ref = meas[f"healthy_liver_{lobe}"]["bqml_mean"]
            n_true = tr[f"healthy_liver_{lobe}"]["bqml"]
            if les:
                vox = np.array([meas[l]["voxels"] for l in les], dtype=float)
                t_ref = float(np.sum([meas[l]["bqml_mean"] * meas[l]["voxels"] for l in les]) / vox.sum())
                v = np.array([volumes[l] for l in les])
                t_true = float(np.sum([tr[l]["bqml"] * volumes[l] for l in les]) / v.sum())
            else:
                t_ref = t_true = float("nan")
            row[lobe] = {"lesions": les, "t_bqml_reference": t_ref, "n_bqml_reference": n_ref,
                         "tn_reference": t_ref / n_ref if les else None,
                         "t_bqml_true": t_true, "n_bqml_true": n_true, "tn_true": t_true / n_true if les else None,
                         "tn_per_lesion_reference": {l: meas[l]["bqml_mean"] / n_ref for l in les},
                         "tn_per_lesion_true": {l: tr[l]["bqml"] / n_true for l in les}}
            if not les:
                row[lobe]["t_bqml_reference"] = row[lobe]["t_bqml_true"] = None
        if acts["treated_lobe"]:
            t, c = acts["treated_lobe"], "left" if acts["treated_lobe"] == "right" else "right"
            if row[t]["tn_reference"] and row[c]["tn_reference"]:
                row["treated_over_control_reference"] = row[t]["tn_reference"] / row[c]["tn_reference"]
                row["treated_over_control_true"] = row[t]["tn_true"] / row[c]["tn_true"]
        tn[s.id] = row

    return {
        "schema": "prrtquant-phantom-truth/1",
        "generator": {"version": __version__, "design": opt.design, "size": opt.size, "seed": opt.seed,
                      "options": {k: v for k, v in vars(opt).items() if k not in ("design", "size", "seed")
                                  and not (k in LATE_OPTION_DEFAULTS and v == LATE_OPTION_DEFAULTS[k])}},
        "pseudonym": pseudonym,
        "identifiers": {"patient_name": patient.name, "patient_id": patient.patient_id,
                        "birth_date": patient.birth_date},
        "patient": {"sex": patient.sex, "weight_kg": patient.weight_kg, "height_m": patient.height_m},
        "design": opt.design,
        "treated_lobe": acts["treated_lobe"],
        "reference_session": ref.id,
        "lesions": {l: {"lobe": anat.lesion_lobe[l], "center_mm": list(anat.by_name[l].shape.center),  # type: ignore[attr-defined]
                        "radius_mm": anat.by_name[l].shape.radius,  # type: ignore[attr-defined]
                        "volume_ml": volumes[l], "ia_enhanced": l in targets} for l in lesions},
        "extrahepatic": {e: {"center_mm": list(anat.by_name[e].shape.center),  # type: ignore[attr-defined]
                             "radius_mm": anat.by_name[e].shape.radius,  # type: ignore[attr-defined]
                             "volume_ml": volumes[e]} for e in anat.extrahepatic},
        "volumes_ml": volumes,
        "anatomy": anat.meta,
        "enhancement_ratio": {
            "target_lesions": targets,
            "true": er_true,
            "true_patient": summary([er_true[l] for l in targets]),
            "reference_measured": er_ref,
            "reference_patient_suvmean": summary([er_ref[l]["er_mean"] for l in targets]),
            "reference_patient_suvmax": summary([er_ref[l]["er_max"] for l in targets]),
            "threshold": threshold,
        },
        "suv_true": acts["suv"],
        "tn": tn,
        "cycles": cycles,
        "sessions": st,
    }


def _sheet(opt: PhantomOptions, acts: dict[str, Any], sessions: list[Session], st: dict[str, Any],
           pseudonym: str) -> dict[str, Any]:
    """What the site's per-patient sheet holds: facts the headers cannot say. No identifiers."""
    return {
        "patient": pseudonym,
        "design": opt.design,
        "ia_pet_study_instance_uid": st["pet_ia"]["study_instance_uid"],
        "treated_lobe": acts["treated_lobe"],
        "camera_cps_per_mbq": opt.camera_cps_per_mbq,
        "weight_kg": None,
    }
