"""Absolute 177Lu numbers through the whole workflow, for every way consoles store SPECT values.

For each SPECT storage format of the generator (``prrtquant phantom --spect-format``) one tiny lobar
patient (same seed, so the same anatomy and kinetics) goes through ingest -> register -> quantify ->
dosimetry by the command line, and is compared with its truth:

* activity per region and time point (``cycles.tsv``) against the generator's reference (the stored
  image summed over the exact region on the SPECT grid, ``reference_measured``);
* time-integrated activity of the liver and both lobes (``dosimetry.tsv``) against the analytic
  kinetics, times the region's mean recovery on this grid (reference / true activity over the
  time points: partial volume is a property of the 6.4 mm grid, not of the integration);
* the physical bounds: nothing flagged.

Usage: ``.venv/bin/python benchmarks/storage_variants.py [--out DIR] [--formats a,b]``; prints one
markdown table (the README's "Validated" rows come from it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from prrtquant.cli import main
from prrtquant.phantom.generator import generate_patient

FORMATS = ["nm_counts", "nm_counts_scaled", "nm_bqml", "nm_bqml_rescale", "nm_bqml_rwv_rescale", "nm_starguide",
           "pt_bqml"]
ORGANS = ["liver", "liver_left", "liver_right", "spleen", "kidney_left", "kidney_right"]
TIA_REGIONS = ["liver", "liver_left", "liver_right"]


def run_variant(fmt: str, work: Path, seed: int = 7) -> dict[str, float]:
    pdir = work / fmt / "patient"
    truth = generate_patient(pdir, design="lobar_ia", size="tiny", seed=seed, spect_format=fmt)
    sheet = json.loads((pdir / "sheet.json").read_text())
    w = work / fmt
    pd.DataFrame([{"patient": "V", "dicom_dir": str(pdir / "DICOM"), "design": sheet["design"],
                   "ia_pet_study_instance_uid": sheet["ia_pet_study_instance_uid"],
                   "treated_lobe": sheet["treated_lobe"] or "", "camera_cps_per_mbq": str(sheet["camera_cps_per_mbq"]),
                   "weight_kg": "", "spect_sheet": str(pdir / sheet["spect_sheet"]) if sheet.get("spect_sheet") else ""}
                  ]).to_csv(w / "patients.tsv", sep="\t", index=False)
    t0 = time.perf_counter()
    for argv in (["ingest", str(pdir / "DICOM"), "--out", str(w / "ingest"), "--patient", "V", "--sheet",
                  str(w / "patients.tsv")],
                 ["register", str(w / "ingest"), "--out", str(w / "register")],
                 ["quantify", str(w / "ingest"), str(w / "register"), "--out", str(w / "quantify")],
                 ["dosimetry", str(w / "ingest"), str(w / "register"), "--out", str(w / "dosimetry")]):
        assert main(argv) == 0, argv
    wall = time.perf_counter() - t0
    cycles = pd.read_csv(w / "quantify" / "cycles.tsv", sep="\t")
    act_err = []
    for r in cycles[cycles.region.isin(ORGANS)].itertuples():
        ref = truth["sessions"][r.session]["reference_measured"][r.region]["activity_mbq"]
        act_err.append(abs(r.activity_mbq / ref - 1.0))
    dos = pd.read_csv(w / "dosimetry" / "dosimetry.tsv", sep="\t", dtype={"cycle": str})
    tia_err = []
    for c, info in truth["cycles"].items():
        for region in TIA_REGIONS:
            rec = [truth["sessions"][s]["reference_measured"][region]["activity_mbq"]
                   / truth["sessions"][s]["true"][region]["activity_mbq"] for s in info["time_points"]]
            expected = info["tia_mbq_h"][region] * float(np.mean(rec))
            got = dos[(dos.cycle == c) & (dos.region == region)].tia_mbq_h.iloc[0]
            tia_err.append(abs(got / expected - 1.0))
    flagged = json.loads((w / "dosimetry" / "summary.json").read_text()).get("physical_bounds") or []
    return {"max_activity_err": max(act_err), "median_activity_err": float(np.median(act_err)),
            "max_tia_err": max(tia_err), "n_flags": len(flagged), "wall_s": wall}


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--formats", default=",".join(FORMATS))
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="prrtquant-storage-"))
    rows = []
    for fmt in args.formats.split(","):
        (work / fmt).mkdir(parents=True, exist_ok=True)
        rows.append({"format": fmt, **run_variant(fmt, work)})
        print(rows[-1], flush=True)
    print("\n| SPECT storage | organ activity per time point vs reference (max / median) | liver & lobe TIA vs "
          "analytic × recovery (max) | physical-bound flags |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| `{r['format']}` | {100 * r['max_activity_err']:.2f} % / {100 * r['median_activity_err']:.2f} % | "
              f"{100 * r['max_tia_err']:.2f} % | {r['n_flags']} |")


if __name__ == "__main__":
    _main()
