"""Shared tolerances, problem builders and independent weight-space references."""

import functools

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

import gramflow as gf

# Relative Frobenius tolerance per dtype, for comparisons against autodiff.
RTOL = {jnp.dtype("float64"): 1e-10, jnp.dtype("float32"): 1e-4}

# Unequal, odd widths per depth L = number of hidden layers.
WIDTHS = {1: (7,), 2: (9, 5), 3: (7, 11, 5), 4: (5, 9, 3, 7)}
PARAMETRIZATIONS = ("standard", "ntk", "mean_field")
OUT_DIMS = (None, 2)
DTYPES = (jnp.float64, jnp.float32)


def pid(rtol, atol, *, dtmin=None):
    """The step-size controller of the former `flow(..., rtol=, atol=, dtmin=)`: a
    `diffrax.PIDController` forcing its smallest step. `dtmin` is an absolute time (the
    former relative `dtmin` times `t1`)."""
    return diffrax.PIDController(rtol=rtol, atol=atol, dtmin=dtmin, force_dtmin=True)


def problem(key, depth, *, out_dim=None, parametrization="ntk", dtype=jnp.float64, P=6, d=3):
    """A random network and a random regression problem (targets unrelated to the net)."""
    kn, kx, ky = jax.random.split(key, 3)
    net = gf.ReLUNet.init(
        kn, d, WIDTHS[depth], out_dim=out_dim, parametrization=parametrization, dtype=dtype
    )
    X = jax.random.normal(kx, (P, d), dtype)
    y = jax.random.normal(ky, (P,) if out_dim is None else (P, out_dim), dtype)
    return net, X, y


def plain_f(weights, readout, scales, X, probes_h=None, probes_z=None):
    """The network as a plain function of its weights, written independently of gramflow.

    Additive per-sample probes on pre-activations (`probes_h`) and activations (`probes_z`)
    make `∂f_μ/∂probe_l[μ]` the fields Δ_l and B_l.
    """
    z = X
    hs = []
    for l, W in enumerate(weights):
        h = scales[l] * jnp.einsum("pi,ni->pn", z, W)
        if probes_h is not None:
            h = h + probes_h[l]
        hs.append(h)
        z = jnp.where(h > 0, h, 0.0)  # relu with relu'(0) = 0, as the identities fix it
        if probes_z is not None:
            z = z + probes_z[l]
    return scales[-1] * jnp.einsum("pn,n...->p...", z, readout), hs


def net_f(net, X):
    return plain_f(net.weights, net.readout, net.scales, X)[0]


# The references below are jitted on plain arrays (not the network, whose parametrization is
# static): one program per shape, shared by every parametrization and every test.


def per_sample_grad(net, X, which):
    """`∂f_μ/∂probe_l[μ]` for every layer: `(P, N_l)` or `(P, k, N_l)`."""
    return _per_sample_grad(net.weights, net.readout, net.scales, X, which)


@functools.partial(jax.jit, static_argnames="which")
def _per_sample_grad(weights, readout, scales, X, which):
    _, hs = plain_f(weights, readout, scales, X)
    zeros = [jnp.zeros_like(h) for h in hs]

    def total(p):
        kw = {"probes_h": p} if which == "h" else {"probes_z": p}
        return jnp.sum(plain_f(weights, readout, scales, X, **kw)[0], axis=0)

    jac = jax.jacrev(total)(zeros)
    return [j if j.ndim == 2 else jnp.moveaxis(j, 0, 1) for j in jac]


def jacobian_kernels(net, X):
    """Per-layer `J_l J_lᵀ` from `jax.jacrev`, in gramflow's layout `(P,P)` / `(P,P,k,k)`."""
    return _jacobian_kernels(net.weights, net.readout, net.scales, X)


@jax.jit
def _jacobian_kernels(weights, readout, scales, X):
    P = X.shape[0]
    jac = jax.jacrev(lambda ws: plain_f(ws, readout, scales, X)[0])(weights)
    out = []
    for j in jac:
        lead = j.shape[: j.ndim - 2]
        J = j.reshape(int(np.prod(lead)), -1)
        K = J @ J.T
        if len(lead) == 2:
            k = lead[1]
            K = K.reshape(P, k, P, k).transpose(0, 2, 1, 3)
        out.append(K)
    return out


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(b.ravel())
    return np.linalg.norm((a - b).ravel()) / (den if den > 0 else 1.0)


def assert_rel_close(a, b, dtype, *, what=""):
    """Every leaf of `a` within the dtype's relative Frobenius tolerance of `b`."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb), f"{what}: {len(la)} leaves vs {len(lb)}"
    for i, (x, y) in enumerate(zip(la, lb)):
        assert x.shape == y.shape, f"{what}[{i}]: shape {x.shape} vs {y.shape}"
        err = rel_err(x, y)
        assert err <= RTOL[jnp.dtype(dtype)], f"{what}[{i}]: relative error {err:.3e}"
