"""Diagnostics: pure functions of a network, state or trajectory.

- balance laws of homogeneous networks (`balance`, `gain_balance`);
- spectral sensitivity of the kernels (`eigenvalue_sensitivity`) and sharpness of the loss
  (`sharpness`);
- fixed points of the collective flow and their stability (`fixed_point`,
  `velocity_jacobian`);
- robustness to input and weight perturbations (`robustness`) and depth scaling of the
  kernel and of training (`depth_scaling`).
"""

from .studies.balance import balance as balance
from .studies.balance import gain_balance as gain_balance
from .studies.fixed_points import (
    FixedPoint as FixedPoint,
)
from .studies.fixed_points import (
    fixed_point as fixed_point,
)
from .studies.fixed_points import (
    velocity_jacobian as velocity_jacobian,
)
from .studies.robustness import (
    DepthScaling as DepthScaling,
)
from .studies.robustness import (
    Robustness as Robustness,
)
from .studies.robustness import (
    depth_scaling as depth_scaling,
)
from .studies.robustness import (
    kernel_spectrum as kernel_spectrum,
)
from .studies.robustness import (
    robustness as robustness,
)
from .studies.spectral import (
    Sensitivity as Sensitivity,
)
from .studies.spectral import (
    Sharpness as Sharpness,
)
from .studies.spectral import (
    eigenvalue_sensitivity as eigenvalue_sensitivity,
)
from .studies.spectral import (
    sharpness as sharpness,
)
from .studies.structure import (
    METRICS as METRICS,
)
from .studies.structure import (
    StructureStudy as StructureStudy,
)
from .studies.structure import (
    corrected_structure as corrected_structure,
)
from .studies.structure import (
    default_structures as default_structures,
)
from .studies.structure import (
    pathway_structure as pathway_structure,
)
from .studies.structure import (
    structure_study as structure_study,
)
