"""The file contract between stages: what every stage writes, its columns, and the one reader of each file.

Each stage writes one folder per patient (``results/{patient}/{stage}``; the cohort one folder for all);
every table and JSON document in it is declared here once, with the stage that writes it, and read back only
through :meth:`Table.read` / :meth:`Document.read`, so a missing file is always the same clear error naming
the file and the stage to run. Images are NIfTI with a JSON sidecar (:func:`read_sidecar`); their paths
are listed in the tables (relative to the folder that lists them).

>>> INVENTORY.name, INVENTORY.stage, INVENTORY.columns[:3]
('inventory.tsv', 'ingest', ('series_instance_uid', 'modality', 'session'))
>>> sorted(f.name for f in OUTPUTS["register"])
['masks.tsv', 'qc.json']
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import StageInputError
from ..dicom.index import SERIES_COLUMNS
from ..io import atomic_path, sidecar_of, write_json

__all__ = ["StageInputError", "Table", "Document", "OUTPUTS", "read_sidecar", "INVENTORY", "SESSIONS", "MASKS",
           "REGISTRATION_QC", "LESIONS", "ORGANS", "LOBES", "LOBE_LESIONS", "CYCLES", "ELIGIBILITY",
           "QUANTIFY_SUMMARY", "TAC", "FITS", "DOSIMETRY", "DVH", "DOSIMETRY_SUMMARY", "PATIENT_TABLES",
           "COHORT_ELIGIBILITY", "LOBAR_COMPARISON", "PHYSICAL_BOUNDS", "COHORT_SUMMARY", "SERIES", "REGISTRATION_QC_TABLE"]


def _missing(path: Path, stage: str) -> StageInputError:
    return StageInputError(f"{path}: missing (written by the {stage} stage: run `prrtquant {stage}` first)")


@dataclass(frozen=True)
class Table:
    """A tab-separated table a stage writes; ``columns`` fixed (in this order) or empty when set by its rows."""

    name: str
    stage: str
    description: str
    columns: tuple[str, ...] = ()

    def path(self, folder: str | Path) -> Path:
        """Where the table is in a stage folder."""
        return Path(folder) / self.name

    def exists(self, folder: str | Path) -> bool:
        """Whether the stage folder holds the table."""
        return self.path(folder).is_file()

    def read(self, folder: str | Path, *, text: bool = True) -> pd.DataFrame:
        """The table: every cell as text (``text``, empty cells as ''), or with pandas' typed columns."""
        p = self.path(folder)
        if not p.is_file():
            raise _missing(p, self.stage)
        if text:
            return pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False)
        return pd.read_csv(p, sep="\t")

    def frame(self, rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
        """Rows (or a frame) as this table: the declared columns in their order."""
        if isinstance(rows, pd.DataFrame):
            return rows
        return pd.DataFrame(list(rows), columns=list(self.columns) or None)

    def write(self, folder: str | Path, rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> Path:
        """Write the table into ``folder`` (a stage's temporary folder: the stage folder is atomic)."""
        p = self.path(folder)
        self.frame(rows).to_csv(p, sep="\t", index=False)
        return p

    def write_atomic(self, folder: str | Path, rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> Path:
        """Write the table into an existing folder, atomically (cohort outputs are single files)."""
        p = self.path(folder)
        with atomic_path(p) as tmp:
            self.frame(rows).to_csv(tmp, sep="\t", index=False)
        return p


@dataclass(frozen=True)
class Document:
    """A JSON document a stage writes (strict JSON: NaN and ±inf as null)."""

    name: str
    stage: str
    description: str

    def path(self, folder: str | Path) -> Path:
        """Where the document is in a stage folder."""
        return Path(folder) / self.name

    def exists(self, folder: str | Path) -> bool:
        """Whether the stage folder holds the document."""
        return self.path(folder).is_file()

    def read(self, folder: str | Path) -> dict[str, Any]:
        """The document."""
        p = self.path(folder)
        if not p.is_file():
            raise _missing(p, self.stage)
        return dict(json.loads(p.read_text()))

    def write(self, folder: str | Path, obj: Mapping[str, Any]) -> Path:
        """Write the document into ``folder`` (a stage's temporary folder)."""
        return write_json(self.path(folder), obj)

    def write_atomic(self, folder: str | Path, obj: Mapping[str, Any]) -> Path:
        """Write the document into an existing folder, atomically."""
        p = self.path(folder)
        with atomic_path(p) as tmp:
            write_json(tmp, obj)
        return p


def read_sidecar(image: str | Path) -> dict[str, Any]:
    """The JSON sidecar of a stage's NIfTI image (``x.nii.gz`` -> ``x.json``): geometry, units, provenance."""
    p = sidecar_of(image)
    if not p.is_file():
        raise StageInputError(f"{p}: missing sidecar of {Path(image).name}")
    return dict(json.loads(p.read_text()))


# ------------------------------------------------------------------------------------------------ index

SERIES = Table("series.tsv", "index", "one row per DICOM series (headers only)", tuple(SERIES_COLUMNS))

# ------------------------------------------------------------------------------------------------ ingest

INVENTORY = Table("inventory.tsv", "ingest", "one row per written image or mask (paths relative to the folder)", (
    "series_instance_uid", "modality", "session", "role", "roi", "units", "path", "source_roi_name", "mask_source",
    "study_instance_uid", "frame_of_reference_uid", "acquisition_datetime", "radionuclide", "route", "cycle",
    "hours_pi", "note", "fine_path", "distance_path"))
SESSIONS = Document("sessions.json", "ingest", "patient, design, treated lobe and every session (cycle, hours after "
                    "injection, route, injected activity), plausibility flags and physical bounds")

# ------------------------------------------------------------------------------------------------ register

MASKS = Table("masks.tsv", "register", "every reference mask propagated onto each PET/SPECT grid (binary and "
              "fractional); mask_session added with MR masks: the session the mask was drawn on", (
                  "session", "image_role", "image_path", "roi", "kind", "voxels", "path", "in_field_of_view",
                  "mask_session"))
REGISTRATION_QC = Document("qc.json", "register", "reference session, mask source, and per session the "
                           "registration's QC metrics, pass/fail and reasons")

# ------------------------------------------------------------------------------------------------ quantify

LESIONS = Table("lesions.tsv", "quantify", "per target lesion: IA/IV uptake, ER, lobe, SSTR positivity", (
    "lesion", "lobe", "lobe_fraction", "volume_ml", "suvmean_ia", "suvmax_ia", "suvpeak_ia", "bqml_mean_ia",
    "suvmean_iv", "suvmax_iv", "suvpeak_iv", "bqml_mean_iv", "er_mean", "er_max", "er_peak", "tlr_iv",
    "sstr_positive"))
ORGANS = Table("organs.tsv", "quantify", "per organ at risk: uptake on IA and IV PET", (
    "region", "suvmean_ia", "suvmean_iv", "suvmax_ia", "suvmax_iv", "ratio_ia_iv"))
LOBES = Table("lobes.tsv", "quantify", "per SPECT time point and lobe: T/N", (
    "cycle", "session", "hours_pi", "endpoint", "route", "lobe", "role", "lesions", "t_bqml_per_ml",
    "n_bqml_per_ml", "tn", "tn_treated_over_control", "n_voxels_t", "n_voxels_n", "kidneys_pct_ia",
    "extrahepatic_pct_ia", "note"))
LOBE_LESIONS = Table("lobe_lesions.tsv", "quantify", "per SPECT time point and lesion: concentration, lobe", (
    "cycle", "session", "hours_pi", "lobe", "role", "lesion", "bqml_mean", "tn"))
CYCLES = Table("cycles.tsv", "quantify", "per SPECT time point and region: concentration, MBq, %IA", (
    "cycle", "route", "session", "hours_pi", "nominal_hours_pi", "region", "bqml_mean", "bqml_max", "volume_ml",
    "activity_mbq", "pct_ia", "pct_ia_decay_corrected", "injected_activity_mbq", "bounds_flag"))
ELIGIBILITY = Document("eligibility.json", "quantify", "the IA decision: statistic, value, threshold, lesions")
QUANTIFY_SUMMARY = Document("quantify.json", "quantify", "settings, notes, plausibility and physical-bound flags")

# ------------------------------------------------------------------------------------------------ dosimetry

TAC = Table("tac.tsv", "dosimetry", "per cycle, region and time point: activity, concentration, VOI volume")
FITS = Table("fits.tsv", "dosimetry", "per cycle, region and model: parameters, chi-square, AICc, criterion")
DOSIMETRY = Table("dosimetry.tsv", "dosimetry", "per cycle (and cumulative) and region: TIA, doses, BED, "
                  "uncertainty")
DVH = Table("dvh.tsv", "dosimetry", "cumulative dose-volume histograms per cycle, method and region",
            ("cycle", "region", "method", "dose_gy", "volume_fraction", "volume_ml"))
DOSIMETRY_SUMMARY = Document("summary.json", "dosimetry", "settings, flags, limits and cumulative doses")

# ------------------------------------------------------------------------------------------------ cohort
# (the patient tables above are stacked under the same names, ``patient`` first)

COHORT_ELIGIBILITY = Table("eligibility.tsv", "cohort", "per patient: status, decision, flags")
LOBAR_COMPARISON = Table("lobar_comparison.tsv", "cohort", "paired treated-vs-control lobe T/N per cycle at the "
                         "endpoint time point", (
                             "cycle", "n", "gmr", "ci_low", "ci_high", "mean_log_ratio", "sd_log_ratio",
                             "t_statistic", "p_ttest", "p_wilcoxon", "wilcoxon_method", "n_increase",
                             "share_increase", "patients", "note"))
REGISTRATION_QC_TABLE = Table("registration_qc.tsv", "qc", "every registration of every patient: metric, inverse "
                              "consistency, body Dice, passed, reasons", (
                                  "patient", "session", "registration", "reference_session", "metric",
                                  "inverse_consistency_mm", "body_dice", "passed", "reasons"))
PHYSICAL_BOUNDS = Table("physical_bounds.tsv", "cohort", "every physically impossible number, per patient", (
    "patient", "stage", "quantity", "region", "where", "value", "bound", "unit", "source", "message"))
COHORT_SUMMARY = Document("summary.json", "cohort", "counts, failures, flags, ER distribution, lobar comparison")

#: What every stage writes into its patient folder (images besides, listed in the tables).
OUTPUTS: dict[str, tuple[Table | Document, ...]] = {
    "ingest": (INVENTORY, SESSIONS),
    "register": (MASKS, REGISTRATION_QC),
    "quantify": (LESIONS, ORGANS, LOBES, LOBE_LESIONS, CYCLES, ELIGIBILITY, QUANTIFY_SUMMARY),
    "dosimetry": (TAC, FITS, DOSIMETRY, DVH, DOSIMETRY_SUMMARY),
    "cohort": (COHORT_ELIGIBILITY, LOBAR_COMPARISON, PHYSICAL_BOUNDS, COHORT_SUMMARY),
}
#: Written beside the stage folders: the index's ``results/{patient}/series.tsv`` and the cohort's
#: ``registration_qc.tsv`` (``prrtquant qc``).

#: The per-patient tables the cohort stacks (name -> table).
PATIENT_TABLES: dict[str, Table] = {t.name.removesuffix(".tsv"): t for t in (LESIONS, ORGANS, LOBES, LOBE_LESIONS,
                                                                          CYCLES, DOSIMETRY)}
