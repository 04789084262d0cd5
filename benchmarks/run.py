"""`make bench`: clinical-size measurements (not asserted in tests; medians printed).

Currently measured:
- generation of one `clinical` synthetic patient (target: under 2 minutes on 2 cores), with peak memory;
- ingest of that patient (header index + conversion of every series and mask) next to a plain read of the
  same bytes (`cat` to /dev/null, warm page cache for both); target: ingest within 3x of the plain read.

Environment: BENCH_REPEATS (default 3) repetitions, median reported; BENCH_OUT keeps the outputs.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path


def _generate(out: str) -> tuple[float, float]:
    from prrtquant.phantom.generator import generate_patient

    t0 = time.perf_counter()
    generate_patient(out, design="whole_liver_ia", size="clinical", seed=1, mean_er=3.5)
    wall = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return wall, peak_mib


def _ingest(src: str, out: str) -> tuple[float, float]:
    from prrtquant.ingest import PatientSheet, ingest

    sheet = json.loads((Path(src) / "sheet.json").read_text())
    t0 = time.perf_counter()
    ingest(Path(src) / "DICOM", out, PatientSheet(patient="BENCH", design=sheet["design"],
                                                  ia_pet_study_instance_uid=sheet["ia_pet_study_instance_uid"],
                                                  camera_cps_per_mbq=sheet["camera_cps_per_mbq"]))
    wall = time.perf_counter() - t0
    return wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cat(src: Path) -> float:
    files = [str(f) for f in sorted((src / "DICOM").rglob("*")) if f.is_file()]
    t0 = time.perf_counter()
    for i in range(0, len(files), 500):
        subprocess.run(["cat", *files[i:i + 500]], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> int:
    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    keep = os.environ.get("BENCH_OUT")
    walls, peaks = [], []
    ctx = get_context("spawn")  # a fresh process per run, so peak memory is per run
    for i in range(repeats):
        tmp = Path(tempfile.mkdtemp(prefix="prrtquant-bench-"))
        out = tmp / "patient"
        with ctx.Pool(1) as pool:
            wall, peak = pool.apply(_generate, (str(out),))
        size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
        walls.append(wall)
        peaks.append(peak)
        print(f"  run {i + 1}/{repeats}: {wall:6.1f} s, peak {peak:6.0f} MiB, {size_mb:.0f} MB written", flush=True)
        if keep and i == 0:
            shutil.copytree(out, Path(keep), dirs_exist_ok=True)
        if i < repeats - 1:
            shutil.rmtree(tmp)
    print(f"phantom clinical patient (2 PET/CT + 7 SPECT/CT): median {statistics.median(walls):.1f} s "
          f"(target < 120 s), median peak memory {statistics.median(peaks):.0f} MiB", flush=True)

    cats, ingests, ipeaks = [], [], []
    for i in range(repeats):
        cats.append(_cat(out))
        with ctx.Pool(1) as pool:
            wall, peak = pool.apply(_ingest, (str(out), str(tmp / f"ingest{i}")))
        ingests.append(wall)
        ipeaks.append(peak)
        shutil.rmtree(tmp / f"ingest{i}")
        print(f"  run {i + 1}/{repeats}: cat {cats[-1]:.2f} s, ingest {wall:.1f} s, peak {peak:.0f} MiB", flush=True)
    ratio = statistics.median(ingests) / statistics.median(cats)
    print(f"ingest clinical patient: median {statistics.median(ingests):.1f} s vs plain read "
          f"{statistics.median(cats):.2f} s = {ratio:.1f}x (target <= 3x), median peak memory "
          f"{statistics.median(ipeaks):.0f} MiB")
    # registration of two clinical CTs (reference IV PET/CT and the cycle 1 24 h SPECT/CT), with QC
    ing = tmp / "ingest_reg"
    with ctx.Pool(1) as pool:
        pool.apply(_ingest, (str(out), str(ing)))
    regs, rpeaks, tres = [], [], []
    for i in range(repeats):
        with ctx.Pool(1) as pool:
            wall, peak, tre = pool.apply(_register, (str(ing), str(out / "truth.json")))
        regs.append(wall)
        rpeaks.append(peak)
        tres.append(tre)
        print(f"  run {i + 1}/{repeats}: register {wall:.1f} s (both directions for inverse consistency), "
              f"peak {peak:.0f} MiB, lesion TRE max {tre:.2f} mm", flush=True)
    print(f"rigid+affine CT-to-CT, clinical size: median {statistics.median(regs):.1f} s incl. the backward "
          f"registration for QC (target <= 20 s), median peak memory {statistics.median(rpeaks):.0f} MiB")
    shutil.rmtree(tmp)
    return 0


def _register(ingest_dir: str, truth_path: str) -> tuple[float, float, float]:
    import numpy as np
    import SimpleITK as sitk

    from prrtquant.registration import register_ct

    fixed = sitk.ReadImage(f"{ingest_dir}/pet_iv/ct.nii.gz")
    moving = sitk.ReadImage(f"{ingest_dir}/spect_c1_24h/ct.nii.gz")
    t0 = time.perf_counter()
    res = register_ct(fixed, moving)
    wall = time.perf_counter() - t0
    truth = json.loads(Path(truth_path).read_text())
    m = np.linalg.inv(np.asarray(truth["sessions"]["spect_c1_24h"]["session_to_reference"]))
    tre = max(float(np.linalg.norm(np.asarray(res.transform.TransformPoint(tuple(l["center_mm"])))
                                   - (m[:3, :3] @ np.asarray(l["center_mm"]) + m[:3, 3])))
              for l in truth["lesions"].values())
    return wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, tre


if __name__ == "__main__":
    sys.exit(main())
