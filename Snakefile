# prrtquant: quantification of liver-directed PRRT trials from DICOM.
# This file only wires: configuration, validation (in common.smk), stages, targets.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/index.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/register.smk"
include: "workflow/rules/quantify.smk"
include: "workflow/rules/dosimetry.smk"
include: "workflow/rules/cohort.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
