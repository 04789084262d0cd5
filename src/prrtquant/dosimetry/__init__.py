"""177Lu dosimetry: time-activity fits, TIA, absorbed dose (kernels, S-values), BED, DVH.

Pure computation on numbers, arrays and SimpleITK images in physical space; the stage that reads the
pipeline's files and writes the tables is :mod:`prrtquant.stages.dosimetry`.
"""

from __future__ import annotations

from .constants import (
    ELECTRON_J_PER_MBQ_H,
    ELECTRON_KEV_PER_DECAY,
    LAMBDA_LU177_PER_H,
    LOCAL_DEPOSITION_MGY_KG_PER_MBQ_H,
    PHOTON_LINES,
)
from .dvh import dvh, region_dose, tia_map
from .kernels import (
    density_from_ct,
    kernel_dose,
    kernel_photon_fraction,
    local_deposition_dose,
    lu177_voxel_kernel,
)
from .plots import tac_plot
from .radiobiology import bed, lq_g_factor
from .recovery import RecoveryCurve, combine_relative, recovery_coefficient, volume_relative_sd
from .settings import DosimetrySettings, settings_from_config
from .svalues import (
    ORGAN_REFERENCE_MASS_G,
    ORGAN_S_TABLE,
    SPHERE_S_TABLE,
    organ_s_value,
    sphere_absorbed_fractions,
    sphere_s_value,
)
from .tac import (
    GOF_ALPHA,
    MODELS,
    FitResult,
    aicc,
    evaluate_terms,
    fit_model,
    fit_tac,
    fit_uncertainty,
    hanscheid_tia,
    madsen_tia,
    madsen_tia_sd,
    model_terms,
    select_fit,
    trapezoid_tia,
)

__all__ = [
    "ELECTRON_J_PER_MBQ_H", "ELECTRON_KEV_PER_DECAY", "LAMBDA_LU177_PER_H",
    "LOCAL_DEPOSITION_MGY_KG_PER_MBQ_H", "PHOTON_LINES", "DosimetrySettings", "settings_from_config",
    "MODELS", "GOF_ALPHA", "FitResult", "aicc", "evaluate_terms", "fit_model", "fit_tac", "fit_uncertainty",
    "hanscheid_tia", "madsen_tia", "madsen_tia_sd", "model_terms", "select_fit", "trapezoid_tia",
    "density_from_ct", "kernel_dose", "kernel_photon_fraction", "local_deposition_dose", "lu177_voxel_kernel",
    "ORGAN_REFERENCE_MASS_G", "ORGAN_S_TABLE", "SPHERE_S_TABLE", "organ_s_value", "sphere_absorbed_fractions",
    "sphere_s_value", "bed", "lq_g_factor", "RecoveryCurve", "combine_relative", "volume_relative_sd",
    "recovery_coefficient", "dvh", "region_dose", "tia_map", "tac_plot",
]
