#!/usr/bin/env bash
# Regenerates the bundled synthetic cohort exactly (see README.md in this folder).
set -euo pipefail
cd "$(dirname "$0")"
PRRTQUANT=${PRRTQUANT:-prrtquant}
rm -rf P01 P02 P03
$PRRTQUANT phantom --out P01 --pseudonym P01 --design whole_liver_ia --size tiny --seed 101 --mean-er 4.0 --n-lesions 4
$PRRTQUANT phantom --out P02 --pseudonym P02 --design whole_liver_ia --size tiny --seed 102 --mean-er 2.0 --n-lesions 3 \
    --messy-names --nm-negative-spacing --spect-format nm_counts_scaled
$PRRTQUANT phantom --out P03 --pseudonym P03 --design lobar_ia --size tiny --seed 103 --n-lesions 5 --treated-lobe right \
    --mr --spect-format nm_counts
# the cohort sheet, from each patient's sheet.json (facts the headers cannot say; no identifiers)
${PYTHON:-python3} - <<'PY'
import json
cols = ["patient", "dicom_dir", "design", "ia_pet_study_instance_uid", "treated_lobe", "camera_cps_per_mbq", "weight_kg"]
with open("patients.tsv", "w") as fh:
    fh.write("\t".join(cols) + "\n")
    for p in ("P01", "P02", "P03"):
        s = json.load(open(f"{p}/sheet.json"))
        s["dicom_dir"] = f"{p}/DICOM"
        fh.write("\t".join("" if s.get(c) is None else str(s[c]) for c in cols) + "\n")
PY
