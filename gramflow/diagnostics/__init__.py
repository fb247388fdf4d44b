"""Diagnostics: pure functions of a network, state or trajectory.

- balance laws of homogeneous networks (`balance`, `gain_balance`);
- spectral sensitivity of the kernels (`eigenvalue_sensitivity`) and sharpness of the loss
  (`sharpness`);
- fixed points of the collective flow and their stability (`fixed_point`,
  `velocity_jacobian`);
- robustness to input and weight perturbations (`robustness`) and depth scaling of the
  kernel and of training (`depth_scaling`).
"""

from ._balance import balance as balance
from ._balance import gain_balance as gain_balance
from ._fixed_points import (
    FixedPoint as FixedPoint,
)
from ._fixed_points import (
    fixed_point as fixed_point,
)
from ._fixed_points import (
    velocity_jacobian as velocity_jacobian,
)
from ._robustness import (
    DepthScaling as DepthScaling,
)
from ._robustness import (
    Robustness as Robustness,
)
from ._robustness import (
    depth_scaling as depth_scaling,
)
from ._robustness import (
    kernel_spectrum as kernel_spectrum,
)
from ._robustness import (
    robustness as robustness,
)
from ._spectral import (
    Sensitivity as Sensitivity,
)
from ._spectral import (
    Sharpness as Sharpness,
)
from ._spectral import (
    eigenvalue_sensitivity as eigenvalue_sensitivity,
)
from ._spectral import (
    sharpness as sharpness,
)
from ._study import (
    METRICS as METRICS,
)
from ._study import (
    StructureStudy as StructureStudy,
)
from ._study import (
    corrected_structure as corrected_structure,
)
from ._study import (
    default_structures as default_structures,
)
from ._study import (
    pathway_structure as pathway_structure,
)
from ._study import (
    structure_study as structure_study,
)
