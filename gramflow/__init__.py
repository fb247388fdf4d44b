"""gramflow: gradient descent on fixed-readout ReLU networks as a collective dynamics of fields."""

from . import diagnostics as diagnostics
from ._cost import CostModel as CostModel
from ._mask import Mask as Mask
from ._version import __version__ as __version__
from .dynamics.batch import (
    core_sweep as core_sweep,
)
from .dynamics.batch import (
    pad_network as pad_network,
)
from .dynamics.batch import (
    stack as stack,
)
from .dynamics.batch import (
    width_buckets as width_buckets,
)
from .dynamics.discrete import StepRemainder as StepRemainder
from .dynamics.discrete import step_remainder as step_remainder
from .dynamics.engines import (
    AbstractClosure as AbstractClosure,
)
from .dynamics.engines import (
    AbstractEngine as AbstractEngine,
)
from .dynamics.engines import (
    Collective as Collective,
)
from .dynamics.engines import (
    FieldState as FieldState,
)
from .dynamics.engines import (
    FrozenKernel as FrozenKernel,
)
from .dynamics.engines import (
    FrozenOperators as FrozenOperators,
)
from .dynamics.engines import (
    TruncatedTransport as TruncatedTransport,
)
from .dynamics.engines import (
    Weights as Weights,
)
from .dynamics.engines import (
    WeightsState as WeightsState,
)
from .dynamics.lazy import LazyPredictions as LazyPredictions
from .dynamics.minibatch import batch_key as batch_key
from .dynamics.minibatch import batch_schedule as batch_schedule
from .dynamics.lazy import lazy_predictions as lazy_predictions
from .dynamics.observables import (
    OBSERVABLES as OBSERVABLES,
)
from .dynamics.observables import (
    AbstractObservable as AbstractObservable,
)
from .dynamics.observables import (
    ActiveFraction as ActiveFraction,
)
from .dynamics.observables import (
    Alignment as Alignment,
)
from .dynamics.observables import (
    BalanceDrift as BalanceDrift,
)
from .dynamics.observables import (
    CoactivationDrift as CoactivationDrift,
)
from .dynamics.observables import (
    ConditionNumber as ConditionNumber,
)
from .dynamics.observables import (
    CrossKernel as CrossKernel,
)
from .dynamics.observables import (
    Kernel as Kernel,
)
from .dynamics.observables import (
    KernelDrift as KernelDrift,
)
from .dynamics.observables import (
    KernelEigenvalues as KernelEigenvalues,
)
from .dynamics.observables import (
    KernelShare as KernelShare,
)
from .dynamics.observables import (
    KernelTrace as KernelTrace,
)
from .dynamics.observables import (
    LayerKernelEigenvalues as LayerKernelEigenvalues,
)
from .dynamics.observables import (
    Loss as Loss,
)
from .dynamics.observables import (
    GradientNoise as GradientNoise,
)
from .dynamics.observables import (
    OperatorDrift as OperatorDrift,
)
from .dynamics.observables import (
    Residual as Residual,
)
from .dynamics.observables import (
    Spectators as Spectators,
)
from .dynamics.observables import (
    TestAlignment as TestAlignment,
)
from .dynamics.observables import (
    TestError as TestError,
)
from .dynamics.observables import (
    TestLoss as TestLoss,
)
from .dynamics.observables import (
    TestOutput as TestOutput,
)
from .dynamics.observables import (
    View as View,
)
from .dynamics.simulate import (
    Trajectory as Trajectory,
)
from .dynamics.simulate import (
    default_controller as default_controller,
)
from .dynamics.simulate import (
    flow as flow,
)
from .dynamics.simulate import (
    simulate as simulate,
)
from .dynamics.sweep import SweepResult as SweepResult
from .dynamics.sweep import sweep as sweep
from .fields.kernels import (
    LayerKernels as LayerKernels,
)
from .fields.kernels import (
    collective_kernel as collective_kernel,
)
from .fields.kernels import (
    layer_kernels as layer_kernels,
)
from .fields.limits import limit_kernels as limit_kernels
from .fields.limits import limit_normalization as limit_normalization
from .fields.matvec import (
    KernelEigs as KernelEigs,
)
from .fields.matvec import (
    kernel_eigs as kernel_eigs,
)
from .fields.matvec import (
    kernel_matvec as kernel_matvec,
)
from .fields.operators import (
    OperatorSummary as OperatorSummary,
)
from .fields.operators import (
    block_operator as block_operator,
)
from .fields.operators import (
    hierarchy_velocities as hierarchy_velocities,
)
from .fields.operators import (
    operator_pairs as operator_pairs,
)
from .fields.operators import (
    operator_summary as operator_summary,
)
from .fields.operators import (
    pullback_operators as pullback_operators,
)
from .fields.operators import (
    pushforward_operators as pushforward_operators,
)
from .fields.state import (
    CollectiveState as CollectiveState,
)
from .fields.state import (
    collective_state as collective_state,
)
from .fields.state import (
    parameter_gradients as parameter_gradients,
)
from .fields.state import (
    pullback_gradients as pullback_gradients,
)
from .fields.velocities import Velocities as Velocities
from .fields.velocities import velocities as velocities
from .fields.verify import VerificationReport as VerificationReport
from .fields.verify import verify as verify
from .model.layer import Layer as Layer
from .model.layer import LayerParams as LayerParams
from .model.network import ReLUNet as ReLUNet
from .model.network import gamma0 as gamma0
from .model.network import natural_lr as natural_lr
from .model.network import trainable as trainable
from .studies.closure import CLOSURES as CLOSURES
from .studies.closure import ClosureStudy as ClosureStudy
from .studies.closure import closure_engine as closure_engine
from .studies.closure import closure_study as closure_study
from .studies.data import load_data as load_data
from .studies.data import load_digits as load_digits
from .studies.data import teacher_student as teacher_student
from .studies.limits import LimitStudy as LimitStudy
from .studies.limits import limit_study as limit_study
