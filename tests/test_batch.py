"""The pure sweep core (a JAX function: jit, vmap, grad) and what the driver adds on top."""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gramflow as gf
from gramflow.dynamics.batch import (
    core_sweep,
    flat_random_bits,
    pad_network,
    run_pairs,
    stack,
    vmap_keys,
    width_buckets,
    working_bytes,
)
from gramflow.dynamics.observables import resolve


@pytest.fixture
def data():
    return gf.teacher_student(jax.random.key(0), samples=10, in_dim=4)


def nets_of(widths, seeds=(0, 1)):
    return stack([gf.ReLUNet.init(jax.random.key(s), 4, widths) for s in seeds])


def test_core_equals_separate_runs_and_is_a_jax_function(data):
    X, y = data
    nets, lrs = nets_of((6, 5)), jnp.array([0.05, 0.1])
    batch = jax.jit(lambda n, l: core_sweep(n, X, y, steps=8, lrs=l, record_every=4))(nets, lrs)
    assert batch.loss.shape == (2, 2, 3)
    for b, r in itertools.product(range(2), range(2)):
        net = gf.ReLUNet.init(jax.random.key(b), 4, (6, 5))
        one = gf.simulate(net, X, y, steps=8, lr=float(lrs[r]), record_every=4)
        assert np.allclose(batch.loss[b, r], one.loss, rtol=1e-12, atol=0)
        assert np.allclose(batch.final.weights[1][b, r], one.final.weights[1], rtol=1e-12,
                           atol=1e-14)

    def final_loss(lrs):
        return core_sweep(nets, X, y, steps=5, lrs=lrs).loss[..., -1].sum()

    g = jax.grad(final_loss)(lrs)
    eps = 1e-6  # central finite differences of the same function
    fd = [(final_loss(lrs.at[i].add(eps)) - final_loss(lrs.at[i].add(-eps))) / (2 * eps)
          for i in range(2)]
    assert np.allclose(g, fd, rtol=1e-6)
    vm = jax.vmap(lambda l: core_sweep(nets, X, y, steps=5, lrs=l[None]).loss)(lrs)
    assert np.allclose(vm[:, :, 0], core_sweep(nets, X, y, steps=5, lrs=lrs).loss.transpose(
        1, 0, 2), rtol=1e-12)


def test_core_runs_a_batch_of_optimizers(data):
    X, y = data
    nets = nets_of((5,))
    lrs = (1e-2, 3e-3)
    batch = core_sweep(nets, X, y, steps=6, engine=[gf.Weights(optax.adam(lr)) for lr in lrs])
    assert batch.loss.shape == (2, 2, 7)
    for b, e in itertools.product(range(2), range(2)):
        net = gf.ReLUNet.init(jax.random.key(b), 4, (5,))
        one = gf.simulate(net, X, y, steps=6, engine=gf.Weights(optax.adam(lrs[e])))
        assert np.allclose(batch.loss[b, e], one.loss, rtol=1e-12)


def test_padding_is_exact_and_buckets_bound_the_waste(data):
    X, y = data
    net = gf.ReLUNet.init(jax.random.key(3), 4, (3, 5))
    a = gf.simulate(net, X, y, steps=10, lr=0.1, engine=gf.Collective())
    b = gf.simulate(pad_network(net, (7, 9)), X, y, steps=10, lr=0.1, engine=gf.Collective())
    assert np.allclose(a.loss, b.loss, rtol=1e-13)
    archs = [(w, w) for w in (4, 5, 8, 9, 30, 33, 100)]
    for waste in (0.0, 0.25, 1.0):
        groups = width_buckets(archs, 4, max_padding=waste)
        assert sorted(i for g, _ in groups for i in g) == list(range(len(archs)))

        def cost(a):
            return sum(n * (m + 1) for n, m in zip(a, (4, *a[:-1])))

        for members, pad_to in groups:
            true = sum(cost(archs[i]) for i in members)
            assert len(members) * cost(pad_to) <= (1 + waste) * true + 1e-9
    assert len(width_buckets(archs, 4, 0.0)) == len(archs)
    assert len(width_buckets(archs, 4, 0.25)) < len(archs)


def test_identical_sweep_does_not_retrace(data):
    X, y = data
    traces = []

    def counted(view):  # an observable of the fields that counts its own tracing
        traces.append(1)
        return jnp.sum(view.H[0])

    kw = dict(widths=(3, 5), depths=(1,), seeds=(0, 1), lrs=(0.05,), steps=4,
              observables={"h": counted}, progress=False)
    first = gf.sweep(X, y, **kw)
    n = len(traces)
    assert n >= 1
    second = gf.sweep(X, y, **kw)
    assert len(traces) == n
    assert np.array_equal(first.observables["h"], second.observables["h"])


def test_result_reloads_with_dimension_names(data, tmp_path):
    X, y = data
    res = gf.sweep(X, y, widths=(3,), depths=(1, 2), seeds=(0,), lrs=(0.1,), steps=3,
                   observables=("kernel_trace", "r"), out=tmp_path, progress=False)
    back = gf.SweepResult.load(tmp_path)
    assert np.array_equal(back.loss, res.loss)
    assert np.array_equal(back.observables["kernel_trace"], res.observables["kernel_trace"],
                          equal_nan=True)
    assert back.dims["kernel_trace"] == ("depth", "width", "seed", "lr", "record", "layer")
    assert back.dims["r"] == ("depth", "width", "seed", "lr", "record", "sample")
    assert back.dims["first_nonfinite"] == ("depth", "width", "seed", "lr")
    with pytest.raises(FileNotFoundError, match="result.json"):
        gf.SweepResult.load(tmp_path / "nothing")


def test_a_batch_shares_its_static_part(data):
    X, y = data
    nets = nets_of((5,))

    def scheduled(n):  # the schedule's length is an int: static, part of the structure
        return gf.Weights(optax.sgd(optax.exponential_decay(0.2, n, 0.1, staircase=True)))

    with pytest.raises(ValueError, match="static part"):
        core_sweep(nets, X, y, steps=3, engine=[scheduled(1), scheduled(100)])
    with pytest.raises(ValueError, match="single engine"):
        core_sweep(nets, X, y, steps=3, lrs=jnp.array([0.1]), engine=[gf.Weights(), gf.Weights()])
    both = core_sweep(nets, X, y, steps=3, engine=[scheduled(1), scheduled(1)])
    assert np.array_equal(both.loss[:, 0], both.loss[:, 1])


def test_vmap_keys_is_vmap_bit_for_bit():
    """Networks of several shapes and structures from one compiled program, equal to
    `ReLUNet.init` on each key: every random draw is the prefix of one flat draw."""
    assert flat_random_bits()  # JAX's default PRNG
    mask = gf.Mask.block_diagonal((6, 6), 2)
    inits = [
        lambda k: gf.ReLUNet.init(k, 4, (3, 5)),
        lambda k: pad_network(gf.ReLUNet.init(k, 4, (6, 6), masks=(None, mask), gains=0.5,
                                              skips=0.3, parametrization="standard"), (8, 8)),
        lambda k: gf.ReLUNet.init(k, 4, (7,), out_dim=3, dtype=jnp.float32,
                                  parametrization="mean_field"),
        lambda k: jax.random.uniform(jax.random.fold_in(k, 3), (2, 9)),
    ]
    seeds = (0, 1, 5, 2**31 - 1)
    data = np.stack([np.asarray(jax.random.key_data(jax.random.key(s))) for s in seeds])
    got = jax.jit(lambda data: vmap_keys([lambda k, f=f: eqx.filter(f(k), eqx.is_array)
                                          for f in inits], data))(data)
    for f, out in zip(inits, got):
        for i, s in enumerate(seeds):
            ref = eqx.filter(f(jax.random.key(s)), eqx.is_array)
            assert jax.tree.structure(ref) == jax.tree.structure(out)
            for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
                assert a.dtype == b.dtype and np.array_equal(a, b[i])


def test_pairs_in_sequence_equal_pairs_side_by_side(data):
    X, y = data
    nets = nets_of((5, 4), seeds=(0, 1, 2, 3, 4))
    lrs = jnp.array([0.05, 0.1, 0.2, 0.1, 0.05])
    kw = dict(steps=6, engine=gf.Weights(), record_every=3, top_m=5, reference=None,
              observables=resolve(("loss", "r", "kernel_trace"), fields=True, top_m=5))
    side = run_pairs(nets, lrs, X, y, **kw)
    for k in (1, 2, 5):
        seq = run_pairs(nets, lrs, X, y, vmap_size=k, **kw)
        assert jax.tree.structure(seq) == jax.tree.structure(side)
        for key in side:
            assert seq[key].shape == side[key].shape
            assert np.allclose(seq[key], side[key], rtol=1e-12, atol=0)


def test_core_takes_batches_and_test_sites(data):
    """`core_sweep(..., batches=, test=)`: shared `(steps, b)` or per-network `(B, steps, b)`
    mini-batches, test sites along; equal to `simulate` per network and lr, and `jax.grad`
    with respect to the lrs still goes through."""
    X, y = data
    test = gf.teacher_student(jax.random.key(9), samples=5, in_dim=4)
    nets, lrs = nets_of((5, 4)), jnp.array([0.05, 0.1])
    keys = [jax.random.key(10 + s) for s in range(2)]
    per_net = jnp.stack([gf.batch_schedule(k, 10, 3, 6) for k in keys])
    for batches in (per_net[0], per_net):
        out = core_sweep(nets, X, y, steps=6, lrs=lrs, record_every=3, batches=batches,
                         test=test, engine=gf.Collective())
        assert out.loss.shape == (2, 2, 3)
        assert out.observables["gradient_noise"].shape == (2, 2, 3, 2)
        for b, r in itertools.product(range(2), range(2)):
            net = gf.ReLUNet.init(jax.random.key(b), 4, (5, 4))
            one = gf.simulate(net, X, y, steps=6, lr=float(lrs[r]), record_every=3,
                              engine=gf.Collective(), test=test,
                              batches=batches if batches.ndim == 2 else batches[b])
            for key in ("test_loss", "gradient_noise"):
                assert np.allclose(out.observables[key][b, r], one.observables[key],
                                   rtol=1e-12, atol=1e-15)
            assert np.allclose(out.loss[b, r], one.loss, rtol=1e-12, atol=0)
    g = jax.grad(lambda eta: core_sweep(nets, X, y, steps=4, lrs=eta, batches=per_net[:, :4])
                 .loss[..., -1].sum())(lrs)
    assert g.shape == (2,) and np.all(np.isfinite(g))
    with pytest.raises(ValueError, match=r"`batches` must be an int array .*B = 2 networks"):
        core_sweep(nets, X, y, steps=6, lrs=lrs, batches=jnp.stack([per_net] * 2))
    with pytest.raises(ValueError, match=r"`batches` must be an int array .*B = 2 networks"):
        core_sweep(nets, X, y, steps=6, lrs=lrs, batches=per_net[:1])


def test_pairs_with_batches_in_sequence_equal_side_by_side(data):
    X, y = data
    nets = nets_of((5, 4), seeds=(0, 1, 2))
    lrs = jnp.array([0.05, 0.1, 0.2])
    batches = jnp.stack([gf.batch_schedule(jax.random.key(s), 10, 4, 6) for s in range(3)])
    test = gf.teacher_student(jax.random.key(9), samples=5, in_dim=4)
    obs = resolve(None, fields=True, top_m=5, test=True, batch_size=4)
    kw = dict(steps=6, engine=gf.Weights(), record_every=3, top_m=5, reference=None,
              observables=obs)
    side = run_pairs(nets, lrs, X, y, batches, test, **kw)
    assert {"test_loss", "test_error", "gradient_noise"} <= set(side)
    for k in (1, 2):
        seq = run_pairs(nets, lrs, X, y, batches, test, vmap_size=k, **kw)
        for key in side:
            assert np.allclose(seq[key], side[key], rtol=1e-12, atol=1e-15)
    one = gf.simulate(gf.ReLUNet.init(jax.random.key(2), 4, (5, 4)), X, y, steps=6, lr=0.2,
                      record_every=3, batches=batches[2], test=test)
    assert np.allclose(side["r"][2], one.r, rtol=1e-12, atol=1e-15)


def test_working_bytes_counts_the_batches(data):
    """The memory estimate reads the program's inputs: the `(steps, b)` index arrays too."""
    X, y = data
    nets = nets_of((5,), seeds=(0,))
    lrs = np.array([0.1])
    kw = dict(steps=200, engine=gf.Weights(), record_every=200, top_m=5, reference=None,
              observables=resolve(("loss",), fields=True, top_m=5))
    full = working_bytes(run_pairs, nets, lrs, X, y, **kw)
    sgd = working_bytes(run_pairs, nets, lrs, X, y, np.zeros((1, 200, 8), np.int32), **kw)
    assert sgd >= full + 200 * 8 * 4
