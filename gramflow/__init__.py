"""gramflow: gradient descent on fixed-readout ReLU networks as a collective dynamics of fields."""

from . import diagnostics as diagnostics
from ._batch import (
    core_sweep as core_sweep,
    pad_network as pad_network,
    stack as stack,
    width_buckets as width_buckets,
)
from ._closure import CLOSURES as CLOSURES, ClosureStudy as ClosureStudy
from ._closure import closure_engine as closure_engine, closure_study as closure_study
from ._cost import CostModel as CostModel
from ._data import teacher_student as teacher_student
from ._demo import load_digits as load_digits
from ._discrete import StepRemainder as StepRemainder, step_remainder as step_remainder
from ._engines import (
    AbstractClosure as AbstractClosure,
    AbstractEngine as AbstractEngine,
    Collective as Collective,
    FieldState as FieldState,
    FrozenKernel as FrozenKernel,
    FrozenOperators as FrozenOperators,
    TruncatedTransport as TruncatedTransport,
    Weights as Weights,
    WeightsState as WeightsState,
)
from ._kernels import (
    LayerKernels as LayerKernels,
    collective_kernel as collective_kernel,
    layer_kernels as layer_kernels,
)
from ._layer import Layer as Layer, LayerParams as LayerParams
from ._mask import Mask as Mask
from ._matvec import (
    KernelEigs as KernelEigs,
    kernel_eigs as kernel_eigs,
    kernel_matvec as kernel_matvec,
)
from ._network import ReLUNet as ReLUNet
from ._observables import (
    OBSERVABLES as OBSERVABLES,
    AbstractObservable as AbstractObservable,
    ActiveFraction as ActiveFraction,
    Alignment as Alignment,
    BalanceDrift as BalanceDrift,
    CoactivationDrift as CoactivationDrift,
    ConditionNumber as ConditionNumber,
    Kernel as Kernel,
    KernelDrift as KernelDrift,
    KernelEigenvalues as KernelEigenvalues,
    KernelShare as KernelShare,
    KernelTrace as KernelTrace,
    LayerKernelEigenvalues as LayerKernelEigenvalues,
    Loss as Loss,
    OperatorDrift as OperatorDrift,
    Residual as Residual,
    View as View,
)
from ._operators import (
    OperatorSummary as OperatorSummary,
    block_operator as block_operator,
    hierarchy_velocities as hierarchy_velocities,
    operator_pairs as operator_pairs,
    operator_summary as operator_summary,
    pullback_operators as pullback_operators,
    pushforward_operators as pushforward_operators,
)
from ._simulate import (
    Trajectory as Trajectory,
    default_controller as default_controller,
    flow as flow,
    simulate as simulate,
)
from ._state import (
    CollectiveState as CollectiveState,
    collective_state as collective_state,
    parameter_gradients as parameter_gradients,
    pullback_gradients as pullback_gradients,
)
from ._sweep import SweepResult as SweepResult, sweep as sweep
from ._velocities import Velocities as Velocities, velocities as velocities
from ._verify import VerificationReport as VerificationReport, verify as verify
from ._version import __version__ as __version__
