"""Benchmark: voxel-S-kernel dose (FFT convolution) on a 128³ SPECT-like TIA map (target ≤ 2 s on 2 cores).

Measured, not asserted. ``bench_kernel(repeats)`` returns the median wall time of
:func:`prrtquant.dosimetry.kernel_dose` (convolution + density scaling, kernel built beforehand), the kernel
build time for the voxel size and the peak resident memory of the process (MiB).

Run as a script: ``.venv/bin/python benchmarks/dosimetry_bench.py [repeats]``.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import numpy as np
import SimpleITK as sitk


def _tia_map(n: int = 128, spacing_mm: float = 4.42) -> tuple[sitk.Image, sitk.Image]:
    """A body-like TIA map (MBq·h per voxel): ellipsoid background, a liver-sized hot region, spheres."""
    z, y, x = np.indices((n, n, n), dtype=np.float32)
    c = (n - 1) / 2.0
    body = ((x - c) / (0.45 * n)) ** 2 + ((y - c) / (0.3 * n)) ** 2 + ((z - c) / (0.48 * n)) ** 2 <= 1.0
    liver = ((x - c - 0.12 * n) / (0.18 * n)) ** 2 + ((y - c) / (0.14 * n)) ** 2 + ((z - c) / (0.12 * n)) ** 2 <= 1.0
    arr = body * 0.02 + liver * 0.5
    rng = np.random.default_rng(0)
    for _ in range(8):
        p = rng.uniform(0.3 * n, 0.7 * n, 3)
        arr += (((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) <= (0.03 * n) ** 2) * 3.0
    img = sitk.GetImageFromArray(arr.astype(np.float64))
    img.SetSpacing((spacing_mm,) * 3)
    img.SetOrigin((-c * spacing_mm,) * 3)
    dens = sitk.GetImageFromArray(np.where(body, 1.05, 0.05))
    dens.CopyInformation(img)
    return img, dens


def bench_kernel(repeats: int = 3) -> dict[str, float | int | str]:
    from prrtquant import dosimetry as D

    tia, dens = _tia_map()
    t0 = time.perf_counter()
    kernel = D.lu177_voxel_kernel(tia.GetSpacing())
    build = time.perf_counter() - t0
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        dose = D.kernel_dose(tia, kernel, dens, workers=2)
        times.append(time.perf_counter() - t0)
    assert dose.GetSize() == tia.GetSize()
    return {"what": "kernel-convolution dose, 128^3 SPECT grid, 4.42 mm voxels",
            "kernel_shape": "x".join(str(s) for s in kernel.shape),
            "median_s": statistics.median(times), "min_s": min(times), "repeats": len(times),
            "kernel_build_s": build, "target_s": 2.0,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


if __name__ == "__main__":
    print(json.dumps(bench_kernel(int(sys.argv[1]) if len(sys.argv) > 1 else 3), indent=1))
