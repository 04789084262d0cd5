# Configuration and sample sheet validation, wildcard constraints and input functions.
import os
import pandas as pd
from snakemake.utils import validate
from prrtquant.config import (
    CONFIG_SCHEMA,
    PATIENTS_SCHEMA,
    check_unique_patients,
    coerce_command_line_values,
    stage_config,
)
from prrtquant.stages.layout import PATIENT_TABLES


# the schemas ship with the package, so the workflow and `prrtquant <stage> --config` validate alike;
# nested `--config section="{key: 4.5}"` values arrive untyped from Snakemake and get their schema types first
coerce_command_line_values(config)
validate(config, schema=str(CONFIG_SCHEMA))

_SHEET = pd.read_csv(config["patients"], sep="\t", dtype=str, keep_default_na=False)
check_unique_patients(_SHEET["patient"], config["patients"])
PATIENTS = _SHEET.set_index(
    "patient", drop=False
)
validate(PATIENTS, schema=str(PATIENTS_SCHEMA))

RESULTS = config["results"]
SHEET_DIR = Path(config["patients"]).parent


wildcard_constraints:
    patient="|".join(PATIENTS.index),


def dicom_dir(wildcards):
    """The patient's DICOM folder; relative paths in the sheet are relative to the sheet."""
    return str(SHEET_DIR / PATIENTS.loc[wildcards.patient, "dicom_dir"])


# the cohort's stacked patient tables (declared in prrtquant.stages.layout), then its own
COHORT_TABLES = [*PATIENT_TABLES, "eligibility", "lobar_comparison"]


def all_targets():
    return [
        f"{RESULTS}/cohort/series.tsv",
        f"{RESULTS}/cohort/inventory.tsv",
        f"{RESULTS}/cohort/summary.json",
        f"{RESULTS}/cohort/registration_qc.tsv",
    ] + expand(f"{RESULTS}/{{patient}}/{{stage}}", patient=PATIENTS.index, stage=["quantify", "dosimetry"]) + expand(
        f"{RESULTS}/{{patient}}/report/{{patient}}.html", patient=PATIENTS.index)
