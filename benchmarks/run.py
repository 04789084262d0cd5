"""`make bench`: clinical-size measurements (not asserted in tests; medians printed).

Currently measured:
- generation of one `clinical` synthetic patient (target: under 2 minutes on 2 cores), with peak memory;
- ingest of that patient (header index + conversion of every series and mask) next to a plain read of the
  same bytes (`cat` to /dev/null, warm page cache for both); target: ingest within 3x of the plain read.

- registration of two clinical CTs (target <= 20 s, <= 2 GiB);
- the whole workflow on that patient (`snakemake --cores 2`), end to end (target <= 90 s wall, <= 3 GiB per
  job), with per-rule wall time and peak memory read from Snakemake's benchmark files;
- kernel-convolution dose on a 128^3 SPECT (target <= 2 s), when the dosimetry module is present.

Environment: BENCH_REPEATS (default 3) repetitions, median reported; BENCH_OUT keeps the outputs;
BENCH_ONLY=phantom,ingest,register,workflow,dosimetry picks parts (a phantom is generated whenever a part
needs one).
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
    generate_patient(out, design="lobar_ia", size="clinical", seed=1, mean_er=3.5)
    wall = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return wall, peak_mib


def _ingest(src: str, out: str) -> tuple[float, float]:
    from prrtquant.stages.ingest import PatientSheet, ingest

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


def _workflow(patient_dir: Path, work: Path, cores: int = 2) -> tuple[float, "object"]:
    """Run the whole workflow on one generated patient; return the wall time and the benchmark table."""
    import pandas as pd

    sheet = json.loads((patient_dir / "sheet.json").read_text())
    work.mkdir(parents=True, exist_ok=True)
    (work / "patients.tsv").write_text(
        "patient\tdicom_dir\tdesign\tia_pet_study_instance_uid\ttreated_lobe\tcamera_cps_per_mbq\tweight_kg\n"
        f"BENCH\t{patient_dir / 'DICOM'}\t{sheet['design']}\t{sheet['ia_pet_study_instance_uid']}\t"
        f"{sheet.get('treated_lobe') or ''}\t{sheet.get('camera_cps_per_mbq') or ''}\t\n")
    (work / "config.yaml").write_text(f"patients: {work / 'patients.tsv'}\nresults: {work / 'results'}\n")
    root = Path(__file__).resolve().parents[1]
    snakemake = str(Path(sys.executable).parent / "snakemake")
    t0 = time.perf_counter()
    subprocess.run([snakemake, "--cores", str(cores), "--configfile", str(work / "config.yaml"), "--quiet",
                    "all"], cwd=root, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = []
    for f in sorted((work / "results" / "benchmarks").rglob("*.tsv")):
        b = pd.read_csv(f, sep="\t")
        rows.append({"rule": f.parent.name, "s": float(b.s.iloc[0]), "max_rss_mib": float(b.max_rss.iloc[0])})
    return wall, pd.DataFrame(rows)


def _accuracy(results: Path, truth: dict) -> None:
    """Clinical-size accuracy of the endpoints against truth's reference (exact masks on each grid)."""
    import pandas as pd

    les = pd.read_csv(results / "BENCH" / "quantify" / "lesions.tsv", sep="\t").set_index("lesion")
    ref = truth["enhancement_ratio"]["reference_measured"]
    for k in ("er_max", "er_mean"):
        err = [100 * abs(les.loc[n, k] / ref[n][k] - 1) for n in ref]
        print(f"  {k} per lesion vs reference: max {max(err):.2f} %, median {statistics.median(err):.2f} % "
              f"({len(err)} lesions)", flush=True)
    lob = pd.read_csv(results / "BENCH" / "quantify" / "lobes.tsv", sep="\t")
    err = [100 * abs(r.tn / truth["tn"][r.session][r.lobe]["tn_reference"] - 1) for r in lob.itertuples()
           if truth["tn"][r.session][r.lobe]["tn_reference"] is not None]
    if err:
        print(f"  lobe T/N vs reference: max {max(err):.2f} %, median {statistics.median(err):.2f} % "
              f"({len(err)} lobe x time points)", flush=True)


def _bench_workflow(out: Path, tmp: Path, repeats: int) -> None:
    walls, tables = [], []
    truth = json.loads((out / "truth.json").read_text())
    for i in range(repeats):
        wall, table = _workflow(out, tmp / f"wf{i}")
        walls.append(wall)
        tables.append(table)
        if i == 0:
            _accuracy(tmp / f"wf{i}" / "results", truth)
        shutil.rmtree(tmp / f"wf{i}")
        print(f"  run {i + 1}/{repeats}: workflow end to end {wall:.1f} s", flush=True)
    import pandas as pd

    per_rule = pd.concat(tables).groupby("rule").median()
    print("per-rule median (Snakemake benchmark files): " + "; ".join(
        f"{r} {v.s:.1f} s / {v.max_rss_mib:.0f} MiB" for r, v in per_rule.iterrows()))
    print(f"workflow, clinical patient (2 PET/CT + 7 SPECT/CT), --cores 2: median {statistics.median(walls):.1f} s "
          f"end to end (target <= 90 s), largest per-job peak {per_rule.max_rss_mib.max():.0f} MiB "
          f"(target <= 3072 MiB)", flush=True)


def _bench_dosimetry(repeats: int) -> None:
    bench_file = Path(__file__).with_name("dosimetry_bench.py")
    if not bench_file.exists():
        return
    sys.path.insert(0, str(bench_file.parent))
    from dosimetry_bench import bench_kernel  # type: ignore[import-not-found]

    res = bench_kernel(repeats)
    print(f"kernel-convolution dose, 128^3 SPECT: {res}", flush=True)


def main() -> int:
    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    keep = os.environ.get("BENCH_OUT")
    only = set(filter(None, os.environ.get("BENCH_ONLY", "phantom,ingest,register,workflow,dosimetry").split(",")))
    if "dosimetry" in only:
        _bench_dosimetry(repeats)
    if not only & {"phantom", "ingest", "register", "workflow"}:
        return 0
    walls, peaks = [], []
    ctx = get_context("spawn")  # a fresh process per run, so peak memory is per run
    for i in range(repeats if "phantom" in only else 1):
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
    if "workflow" in only:
        _bench_workflow(out, tmp, repeats)
    if not only & {"ingest", "register"}:
        shutil.rmtree(tmp)
        return 0

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
