"""Diagnostics: pure functions of a network, state or trajectory.

- balance laws of homogeneous networks (`balance`, `gain_balance`);
- spectral sensitivity of the kernels (`eigenvalue_sensitivity`) and sharpness of the loss
  (`sharpness`);
- fixed points of the collective flow and their stability (`fixed_point`,
  `velocity_jacobian`);
- robustness to input and weight perturbations (`robustness`) and depth scaling of the
  kernel and of training (`depth_scaling`).
"""

from ._balance import balance as balance, gain_balance as gain_balance
from ._fixed_points import (
    FixedPoint as FixedPoint,
    fixed_point as fixed_point,
    velocity_jacobian as velocity_jacobian,
)
from ._robustness import (
    kernel_spectrum as kernel_spectrum,
    DepthScaling as DepthScaling,
    Robustness as Robustness,
    depth_scaling as depth_scaling,
    robustness as robustness,
)
from ._spectral import (
    Sensitivity as Sensitivity,
    Sharpness as Sharpness,
    eigenvalue_sensitivity as eigenvalue_sensitivity,
    sharpness as sharpness,
)
from ._study import (
    METRICS as METRICS,
    StructureStudy as StructureStudy,
    corrected_structure as corrected_structure,
    default_structures as default_structures,
    pathway_structure as pathway_structure,
    structure_study as structure_study,
)
