"""gramflow: gradient descent on fixed-readout ReLU networks as a collective dynamics of fields."""

from . import diagnostics as diagnostics
from ._closure import (
    CLOSURES as CLOSURES,
)
from ._closure import (
    ClosureStudy as ClosureStudy,
)
from ._closure import (
    closure_study as closure_study,
)
from ._cost import CostModel as CostModel
from ._data import teacher_student as teacher_student
from ._demo import load_digits as load_digits
from ._discrete import StepRemainder as StepRemainder
from ._discrete import step_remainder as step_remainder
from ._engines import (
    AbstractClosure as AbstractClosure,
)
from ._engines import (
    AbstractEngine as AbstractEngine,
)
from ._engines import (
    Collective as Collective,
)
from ._engines import (
    FieldState as FieldState,
)
from ._engines import (
    FrozenKernel as FrozenKernel,
)
from ._engines import (
    FrozenOperators as FrozenOperators,
)
from ._engines import (
    TruncatedTransport as TruncatedTransport,
)
from ._engines import (
    Weights as Weights,
)
from ._engines import (
    WeightsState as WeightsState,
)
from ._kernels import (
    LayerKernels as LayerKernels,
)
from ._kernels import (
    collective_kernel as collective_kernel,
)
from ._kernels import (
    layer_kernels as layer_kernels,
)
from ._layer import Layer as Layer
from ._layer import LayerParams as LayerParams
from ._mask import Mask as Mask
from ._matvec import (
    KernelEigs as KernelEigs,
)
from ._matvec import (
    kernel_eigs as kernel_eigs,
)
from ._matvec import (
    kernel_matvec as kernel_matvec,
)
from ._network import ReLUNet as ReLUNet
from ._observables import (
    OBSERVABLES as OBSERVABLES,
)
from ._observables import (
    AbstractObservable as AbstractObservable,
)
from ._observables import (
    ActiveFraction as ActiveFraction,
)
from ._observables import (
    Alignment as Alignment,
)
from ._observables import (
    BalanceDrift as BalanceDrift,
)
from ._observables import (
    CoactivationDrift as CoactivationDrift,
)
from ._observables import (
    ConditionNumber as ConditionNumber,
)
from ._observables import (
    Kernel as Kernel,
)
from ._observables import (
    KernelDrift as KernelDrift,
)
from ._observables import (
    KernelEigenvalues as KernelEigenvalues,
)
from ._observables import (
    KernelShare as KernelShare,
)
from ._observables import (
    KernelTrace as KernelTrace,
)
from ._observables import (
    LayerKernelEigenvalues as LayerKernelEigenvalues,
)
from ._observables import (
    Loss as Loss,
)
from ._observables import (
    OperatorDrift as OperatorDrift,
)
from ._observables import (
    Residual as Residual,
)
from ._observables import (
    View as View,
)
from ._operators import (
    OperatorSummary as OperatorSummary,
)
from ._operators import (
    block_operator as block_operator,
)
from ._operators import (
    hierarchy_velocities as hierarchy_velocities,
)
from ._operators import (
    operator_pairs as operator_pairs,
)
from ._operators import (
    operator_summary as operator_summary,
)
from ._operators import (
    pullback_operators as pullback_operators,
)
from ._operators import (
    pushforward_operators as pushforward_operators,
)
from ._simulate import (
    Trajectory as Trajectory,
)
from ._simulate import (
    default_controller as default_controller,
)
from ._simulate import (
    flow as flow,
)
from ._simulate import (
    simulate as simulate,
)
from ._state import (
    CollectiveState as CollectiveState,
)
from ._state import (
    collective_state as collective_state,
)
from ._state import (
    parameter_gradients as parameter_gradients,
)
from ._state import (
    pullback_gradients as pullback_gradients,
)
from ._sweep import SweepResult as SweepResult
from ._sweep import pad_network as pad_network
from ._sweep import sweep as sweep
from ._velocities import Velocities as Velocities
from ._velocities import velocities as velocities
from ._verify import VerificationReport as VerificationReport
from ._verify import verify as verify
from ._version import __version__ as __version__
