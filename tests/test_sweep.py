"""sweep: padding is exact, chunking changes nothing, interrupted sweeps resume (sweeps over
several devices: test_sharding.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err

import gramflow as gf
import gramflow.dynamics.sweep as sweep_module


@pytest.fixture(scope="module")
def data():
    return gf.teacher_student(jax.random.key(0), samples=10, in_dim=4)


@pytest.mark.parametrize("engine", [gf.Weights(), gf.Collective()])
def test_padded_width_sweep_equals_separate_runs(data, engine):
    X, y = data
    widths, depths, seeds, lrs = (3, 7, (9, 5)), (2,), (0, 1), (0.05, 0.2)
    res = gf.sweep(X, y, widths=widths, depths=depths, seeds=seeds, lrs=lrs, steps=30,
                   record_every=10, engine=engine, progress=False,
                   observables=("loss", "r", "kernel_trace", "active_fraction", "kernel_eigs"))
    assert res.loss.shape == (1, 3, 2, 2, 4)
    assert res.observables["r"].shape == (1, 3, 2, 2, 4, 10)
    assert res.step.tolist() == [0, 10, 20, 30]
    for j, w in enumerate(widths):
        arch = (w, w) if isinstance(w, int) else w
        for s_i, seed in enumerate(seeds):
            for r_i, lr in enumerate(lrs):
                net = gf.ReLUNet.init(jax.random.key(seed), 4, arch)
                traj = gf.simulate(net, X, y, steps=30, lr=lr, record_every=10, engine=engine,
                                   observables=("loss", "r", "kernel_trace", "active_fraction",
                                                "kernel_eigs"))
                got = jax.tree.map(lambda a: a[0, j, s_i, r_i], res.observables)
                assert rel_err(got["r"], traj.r) <= 1e-10
                assert rel_err(got["kernel_trace"], traj.observables["kernel_trace"]) <= 1e-10
                assert rel_err(got["active_fraction"], traj.observables["active_fraction"]) <= 1e-12
                assert rel_err(got["kernel_eigs"], traj.observables["kernel_eigs"]) <= 1e-10
                assert rel_err(res.loss[0, j, s_i, r_i], traj.loss) <= 1e-10


def test_networks_are_built_as_init_and_pad_build_them(data):
    """The driver builds every bucket's networks in one program: bit for bit those of
    `ReLUNet.init` per seed and architecture, zero-padded by `pad_network`."""
    seeds = (0, 3)
    buckets = [(((3, 5), (4, 4)), ({}, {}), (4, 5)),
               (((6, 6),), (dict(masks=(None, gf.Mask.banded((6, 6), 1)), gains=0.5,
                                 skips=0.2),), (6, 6)),
               (((2,),), ({},), (2,))]
    built = sweep_module._build_nets(seeds, 4, buckets, None, "standard", jnp.float64)
    assert len(built) == len(buckets)
    for nets, (archs, kws, pad_to) in zip(built, buckets):
        eager = sweep_module._build_nets_eagerly(seeds, 4, archs, kws, None, "standard",
                                                 jnp.float64, pad_to)
        assert jax.tree.structure(nets) == jax.tree.structure(eager)
        for a, b in zip(jax.tree.leaves(nets), jax.tree.leaves(eager)):
            assert isinstance(a, np.ndarray) and a.shape == (len(archs), len(seeds), *a.shape[2:])
            assert a.dtype == b.dtype and np.array_equal(a, b)
        for w, (arch, kw) in enumerate(zip(archs, kws)):
            for s_i, seed in enumerate(seeds):
                net = gf.pad_network(gf.ReLUNet.init(jax.random.key(seed), 4, arch, **kw,
                                                     parametrization="standard"), pad_to)
                one = jax.tree.map(lambda a, w=w, s_i=s_i: a[w, s_i], nets)
                for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(net)):
                    assert np.array_equal(a, b)


def test_quick_compiler_options(data, monkeypatch):
    """Short programs (the network builder, brief runs) compile with XLA's quick options, to
    the same results; long runs do not; an XLA that does not know the options: without."""
    X, y = data
    kw = dict(widths=(3, 5), depths=(1,), seeds=(0, 1), lrs=(0.1,), steps=3, progress=False)
    reference = gf.sweep(X, y, **kw)
    platform = jax.devices()[0].platform
    options = sweep_module._quick_options(platform)
    assert options is not None or platform != "cpu"
    if options is not None:
        quick = sweep_module._run_jit(10, 4, (5,), 4, 3, 8, platform)
        assert quick is not sweep_module.run_pairs_jit
        assert sweep_module._run_jit(64, 16, (512, 512), 100, 10**4, 8,
                                     platform) is sweep_module.run_pairs_jit
    monkeypatch.setattr(sweep_module, "_QUICK_OPTIONS", {platform: {"xla_no_such_option": 1}})
    monkeypatch.setattr(sweep_module, "_BUILDERS", {})
    sweep_module._quick_options.cache_clear()
    try:
        assert sweep_module._quick_options(platform) is None
        assert np.array_equal(gf.sweep(X, y, **kw).loss, reference.loss)
    finally:
        sweep_module._quick_options.cache_clear()


def test_another_prng_builds_eagerly(data, monkeypatch):
    """Without JAX's default PRNG (whose draws are prefixes of one flat draw) the networks
    are built eagerly, one `ReLUNet.init` each: the same sweep."""
    X, y = data
    kw = dict(widths=(3, 5), depths=(2,), seeds=(0, 1), lrs=(0.1,), steps=4, progress=False)
    reference = gf.sweep(X, y, **kw)
    monkeypatch.setattr(sweep_module, "flat_random_bits", lambda: False)
    assert np.array_equal(gf.sweep(X, y, **kw).loss, reference.loss)


def test_compiling_on_other_threads_changes_nothing(data, monkeypatch, tmp_path):
    """With idle cores the programs compile on other threads, ahead of their calls."""
    from concurrent.futures import ThreadPoolExecutor

    X, y = data
    kw = dict(widths=(3, 9), depths=(2,), seeds=(0, 1), lrs=(0.05, 0.1), steps=6,
              max_padding=0.5, progress=False)
    monkeypatch.setattr(sweep_module, "_compiler_pool", lambda n: sweep_module._Now())
    reference = gf.sweep(X, y, **kw)
    jax.clear_caches()
    pools = []
    monkeypatch.setattr(sweep_module, "_compiler_pool",
                        lambda n: pools.append(n) or ThreadPoolExecutor(2))
    threaded = gf.sweep(X, y, out=tmp_path, **kw)
    assert pools and pools[0] > 2  # the builder and a program per bucket
    assert np.array_equal(threaded.loss, reference.loss)
    assert np.array_equal(threaded.observables["r"], reference.observables["r"],
                          equal_nan=True)
    again = gf.sweep(X, y, out=tmp_path, **kw)  # everything finished: nothing to compile
    assert pools[-1] == 1 and np.array_equal(again.loss, reference.loss)


@pytest.mark.parametrize("vmap_size", [1, 3])
def test_configurations_in_sequence_change_nothing(data, vmap_size):
    """`vmap_size`: configurations side by side in one vmap, the rest one after another; the
    results are those of the full vmap (up to the summation order)."""
    X, y = data
    kw = dict(widths=(3, 6), depths=(1, 2), seeds=(0, 1), lrs=(0.05, 0.1, 0.2), steps=12,
              record_every=4, observables=("loss", "r"), progress=False)
    side = gf.sweep(X, y, vmap_size=1000, **kw)
    seq = gf.sweep(X, y, vmap_size=vmap_size, **kw)
    assert rel_err(seq.observables["r"], side.observables["r"]) <= 1e-12
    assert rel_err(seq.loss, side.loss) <= 1e-12
    assert sweep_module._vmap_size(64, 16, (128, 128), jax.devices()) == 1  # wide: in sequence
    assert sweep_module._vmap_size(10, 4, (3, 3), jax.devices()) > 1000  # narrow: side by side
    with pytest.raises(ValueError, match="`vmap_size` must be a positive int"):
        gf.sweep(X, y, vmap_size=0, **kw)


def test_padding_is_exact_and_padded_weights_stay_zero(data):
    X, y = data
    net = gf.ReLUNet.init(jax.random.key(3), 4, (5, 3))
    padded = gf.pad_network(net, (11, 8))
    assert [w.shape for w in padded.weights] == [(11, 4), (8, 11)]
    assert np.array_equal(padded.scales, net.scales)  # scales of the true widths
    a = gf.simulate(net, X, y, steps=40, lr=0.1)
    b = gf.simulate(padded, X, y, steps=40, lr=0.1)
    assert rel_err(a.r, b.r) <= 1e-12
    W1, W2 = b.final.weights
    assert float(jnp.abs(W1[5:]).max()) == 0.0 and float(jnp.abs(W2[3:]).max()) == 0.0
    assert float(jnp.abs(W2[:, 5:]).max()) == 0.0
    assert rel_err(W1[:5], a.final.weights[0]) <= 1e-12


def test_depths_and_per_layer_observables(data):
    X, y = data
    res = gf.sweep(X, y, widths=(4, 6), depths=(1, 3), seeds=(0,), lrs=(0.1,), steps=5,
                   progress=False)
    share = res.observables["kernel_share"]
    assert share.shape == (2, 2, 1, 1, 6, 3)
    assert np.all(np.isnan(share[0, ..., 1:])) and not np.any(np.isnan(share[1]))
    assert np.allclose(np.nansum(share, axis=-1), 1.0)
    assert res.first_nonfinite.shape == (2, 2, 1, 1)


PER = 10_000  # bytes per configuration, fixed by the `fixed_cost` fixture


@pytest.fixture
def fixed_cost(monkeypatch):
    """Make the per-configuration memory estimate (read off the program) a known number, so
    a test can ask for chunks of a given size through `max_bytes`."""
    monkeypatch.setattr(sweep_module, "working_bytes", lambda *a, **k: PER)
    monkeypatch.setattr(sweep_module, "_COST", {})


def test_chunking_changes_nothing(data, monkeypatch, fixed_cost):
    X, y = data
    calls = []
    real = sweep_module._run_chunk
    monkeypatch.setattr(sweep_module, "_run_chunk",
                        lambda *a: calls.append(1) or real(*a))
    kw = dict(widths=(3, 5, 8), depths=(2,), seeds=(0, 1, 2), lrs=(0.05, 0.1), steps=10,
              progress=False, max_padding=10.0)  # one bucket: every width padded to 8
    one = gf.sweep(X, y, **kw)
    assert len(calls) == 1
    per = PER
    many = gf.sweep(X, y, max_bytes=5 * per, **kw)
    assert len(calls) > 3
    assert rel_err(many.observables["r"], one.observables["r"]) <= 1e-12
    with pytest.raises(ValueError, match="needs about .* bytes, above max_bytes"):
        gf.sweep(X, y, max_bytes=10, **kw)


def test_buckets_in_one_chunk_each_share_one_program(data, monkeypatch, fixed_cost):
    """Buckets that run in one chunk each run in one call of one program, unless their
    chunks together do not fit `max_bytes`: the same results either way."""
    X, y = data
    calls = []
    real = sweep_module._run_chunk
    monkeypatch.setattr(sweep_module, "_run_chunk", lambda *a: calls.append(a[2]) or real(*a))
    kw = dict(widths=(3, 8, 20), depths=(1, 2), seeds=(0, 1), lrs=(0.05, 0.1), steps=8,
              record_every=4, max_padding=0.0, progress=False)  # 3 buckets per depth
    together = gf.sweep(X, y, **kw)
    assert len(calls) == 1 and len(calls[0]) == 6  # the lrs of 6 buckets, 4 configurations each
    apart = gf.sweep(X, y, max_bytes=4 * PER, **kw)  # one chunk each, not all 6 at once
    assert len(calls) == 1 + 6
    assert rel_err(apart.observables["r"], together.observables["r"]) <= 1e-12
    assert np.array_equal(apart.first_nonfinite, together.first_nonfinite)


def test_interrupted_sweep_resumes(data, tmp_path, monkeypatch, fixed_cost):
    X, y = data
    kw = dict(widths=(3, 5), depths=(1, 2), seeds=(0, 1), lrs=(0.05, 0.1), steps=10,
              progress=False, max_bytes=3 * PER)
    reference = gf.sweep(X, y, **kw)
    real = sweep_module._run_chunk
    computed = []

    def interrupted(*args):
        if len(computed) == 3:
            raise KeyboardInterrupt
        computed.append(1)
        return real(*args)

    monkeypatch.setattr(sweep_module, "_run_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gf.sweep(X, y, out=tmp_path, **kw)
    finished = sorted(p.name for p in tmp_path.glob("depth*.json"))
    assert len(finished) == 3 and not list(tmp_path.glob("*.tmp"))
    meta = json.loads((tmp_path / finished[0]).read_text())
    assert {"fingerprint", "depth", "group", "index", "configs", "config", "gramflow",
            "jax"} <= set(meta)
    assert {"width", "seed", "lr"} == set(meta["configs"][0])
    assert len(meta["index"]) == len(meta["configs"])

    recomputed = []
    monkeypatch.setattr(sweep_module, "_run_chunk",
                        lambda *a: recomputed.append(1) or real(*a))
    resumed = gf.sweep(X, y, out=tmp_path, **kw)
    total = len(list(tmp_path.glob("depth*.json")))
    assert len(recomputed) == total - 3  # nothing computed twice
    assert np.array_equal(resumed.observables["r"], reference.observables["r"])  # nothing lost
    again = []
    monkeypatch.setattr(sweep_module, "_run_chunk", lambda *a: again.append(1) or real(*a))
    gf.sweep(X, y, out=tmp_path, **kw)
    assert again == []
    with pytest.raises(ValueError, match="holds chunks of a different sweep.*steps = 10 there, "
                                         "11 now"):
        gf.sweep(X, y, out=tmp_path, **{**kw, "steps": 11})


def test_resume_with_another_chunking(data, tmp_path, monkeypatch, fixed_cost):
    """The chunk size depends on `max_bytes` (by default on the host's memory) and on the
    device count: a resume with another chunking reuses what is finished."""
    X, y = data
    per = PER
    kw = dict(widths=(3, 5), depths=(1,), seeds=(0, 1, 2), lrs=(0.05, 0.1), steps=10,
              progress=False)
    reference = gf.sweep(X, y, **kw)
    real = sweep_module._run_chunk
    calls = []

    def interrupted(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(sweep_module, "_run_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gf.sweep(X, y, out=tmp_path, max_bytes=5 * per, **kw)  # chunks of 5 configurations
    before = {p.name for p in tmp_path.glob("depth*.json")}
    assert len(before) == 2
    sizes = []
    monkeypatch.setattr(sweep_module, "_run_chunk",
                        lambda *a: sizes.append(len(a[2])) or real(*a))
    resumed = gf.sweep(X, y, out=tmp_path, max_bytes=2 * per, **kw)  # chunks of 2
    assert sizes == [2]  # the 2 configurations of 12 that were not finished
    indices = [json.loads(p.read_text())["index"] for p in sorted(tmp_path.glob("depth*.json"))]
    assert sorted(i for index in indices for i in index) == list(range(12))
    assert rel_err(resumed.observables["r"], reference.observables["r"]) <= 1e-12
    again = gf.sweep(X, y, out=tmp_path, **kw)  # default max_bytes: nothing left to run
    assert sizes == [2] and np.array_equal(again.observables["r"], resumed.observables["r"])


def test_masks_with_equal_shape_and_density_are_different_sweeps(data, tmp_path):
    X, y = data
    eye, flipped = gf.Mask(np.eye(4)), gf.Mask(np.eye(4)[::-1])
    assert repr(eye) == repr(flipped)  # what the fingerprint used to see
    kw = dict(widths=(4,), depths=(1,), seeds=(0,), lrs=(0.1,), steps=5, progress=False,
              out=tmp_path)
    first = gf.sweep(X, y, structure=dict(masks=(eye,)), **kw)
    with pytest.raises(ValueError, match=r"holds chunks of a different sweep.*structure"):
        gf.sweep(X, y, structure=dict(masks=(flipped,)), **kw)
    fresh = gf.sweep(X, y, structure=dict(masks=(flipped,)), **{**kw, "out": None})
    assert not np.allclose(fresh.loss, first.loss)
    same = gf.sweep(X, y, structure=dict(masks=(gf.Mask(np.eye(4)),)), **kw)  # resumes
    assert np.array_equal(same.loss, first.loss)
    arrays = {**kw, "out": tmp_path / "arrays"}  # masks given as 0/1 arrays: by value too
    gf.sweep(X, y, structure=dict(masks=(np.eye(4),)), **arrays)
    with pytest.raises(ValueError, match=r"different sweep.*structure"):
        gf.sweep(X, y, structure=dict(masks=(np.eye(4)[::-1],)), **arrays)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip])
@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_damaged_chunk_is_named(data, tmp_path, damage, suffix, fixed_cost):
    X, y = data
    kw = dict(widths=(3,), depths=(1,), seeds=(0, 1), lrs=(0.1,), steps=5, progress=False,
              out=tmp_path, max_bytes=PER)
    first = gf.sweep(X, y, **kw)
    meta, npz = sorted(tmp_path.glob("depth*.json"))[-1], sorted(tmp_path.glob("depth*.npz"))[-1]
    damage(meta if suffix == ".json" else npz)
    with pytest.raises(ValueError, match="damaged") as err:
        gf.sweep(X, y, **kw)
    assert str(meta) in str(err.value) and f"Delete {meta} and {npz}" in str(err.value)
    meta.unlink()
    npz.unlink()
    assert np.array_equal(gf.sweep(X, y, **kw).loss, first.loss)  # recomputed


def test_divergent_configurations_are_reported(data):
    X, y = data
    res = gf.sweep(X, y, widths=(8,), depths=(1,), seeds=(0,), lrs=(0.05, 40.0), steps=200,
                   record_every=50, progress=False)
    assert int(res.first_nonfinite[0, 0, 0, 0]) == -1
    assert int(res.first_nonfinite[0, 0, 0, 1]) > 0


def test_bad_sweeps(data):
    X, y = data
    kw = dict(widths=(3,), depths=(1,), seeds=(0,), lrs=(0.1,), steps=2, progress=False)
    with pytest.raises(ValueError, match="lists 2 per-layer widths but the sweep has depth 1"):
        gf.sweep(X, y, **{**kw, "widths": ((3, 4),)})
    with pytest.raises(ValueError, match="`lrs` must be non-empty, positive"):
        gf.sweep(X, y, **{**kw, "lrs": (0.1, -1.0)})
    with pytest.raises(ValueError, match="unknown parametrization"):
        gf.sweep(X, y, **kw, parametrization="mup")
    with pytest.raises(ValueError, match="`depths` entries must be positive ints"):
        gf.sweep(X, y, **{**kw, "depths": (0,)})
    for bad_y, expected in ((y[:4], r"\(10,\)"), (y[:, None], r"\(10,\)")):
        with pytest.raises(ValueError, match=r"`y` has shape .*`out_dim` = None asks for a "
                                             rf"scalar output: expected `y` of shape {expected}"
                           ) as err:
            gf.sweep(X, bad_y, **kw)
        assert "readout" not in str(err.value)  # no network the caller did not build
    with pytest.raises(ValueError, match=r"`out_dim` = 2 .* expected `y` of shape \(10, 2\)"):
        gf.sweep(X, y, out_dim=2, **kw)
    for name in ("steps", "record_every"):
        with pytest.raises(ValueError, match=f"`{name}` must be a positive int, got 0"):
            gf.sweep(X, y, **{**kw, name: 0})
    with pytest.raises(TypeError, match="`X` has dtype int"):
        gf.sweep(jnp.ones((10, 4), jnp.int32), y, **kw)


def test_sweep_result_docstring_lists_exactly_its_fields():
    import dataclasses
    import re

    doc = gf.SweepResult.__doc__.split("**Fields:**")[1]
    listed = re.findall(r"^\s*- `(\w+)`:", doc, flags=re.M)
    assert listed == [f.name for f in dataclasses.fields(gf.SweepResult)]


# -- test sites and mini-batch sizes ------------------------------------------------------------

@pytest.fixture(scope="module")
def test_set():
    return gf.teacher_student(jax.random.key(7), samples=6, in_dim=4)


def test_test_sites_ride_along_every_configuration(data, test_set):
    """`test=`: the test observables of every configuration are those of `simulate(...,
    test=)` (test_loss and test_error join the defaults), with their dims."""
    X, y = data
    res = gf.sweep(X, y, widths=(3, 5), depths=(1, 2), seeds=(0, 1), lrs=(0.1,), steps=8,
                   record_every=4, engine=gf.Collective(), test=test_set, progress=False)
    assert {"test_loss", "test_error", "kernel_trace"} <= set(res.observables)
    assert res.observables["test_loss"].shape == (2, 2, 2, 1, 3)
    assert res.dims["test_loss"] == ("depth", "width", "seed", "lr", "record")
    for i, L in enumerate((1, 2)):
        for j, w in enumerate((3, 5)):
            net = gf.ReLUNet.init(jax.random.key(1), 4, (w,) * L)
            traj = gf.simulate(net, X, y, steps=8, lr=0.1, record_every=4,
                               engine=gf.Collective(), test=test_set)
            for key in ("test_loss", "test_error"):
                assert rel_err(res.observables[key][i, j, 1, 0], traj.observables[key]) <= 1e-12
            assert rel_err(res.loss[i, j, 1, 0], traj.loss) <= 1e-12
    out = gf.sweep(X, y, widths=(3,), depths=(1,), seeds=(0,), lrs=(0.1,), steps=4,
                   observables=("loss", "test_output"), test=test_set, progress=False)
    assert out.observables["test_output"].shape == (1, 1, 1, 1, 5, 6)
    assert out.dims["test_output"] == ("depth", "width", "seed", "lr", "record", "test_sample")


def test_test_data_are_in_the_fingerprint(data, test_set, tmp_path, monkeypatch):
    """A sweep resumed into a directory written with other test data (or none) refuses its
    chunks, naming `test`; with the same test data it reuses them."""
    X, y = data
    Xt, yt = test_set
    kw = dict(widths=(3,), depths=(1,), seeds=(0, 1), lrs=(0.1,), steps=4, progress=False,
              out=tmp_path)
    first = gf.sweep(X, y, test=(Xt, yt), **kw)
    real, calls = sweep_module._run_chunk, []
    monkeypatch.setattr(sweep_module, "_run_chunk", lambda *a: calls.append(1) or real(*a))
    again = gf.sweep(X, y, test=(np.array(Xt), np.array(yt)), **kw)
    assert calls == [] and np.array_equal(again.observables["test_loss"],
                                          first.observables["test_loss"])
    for other in ((Xt, yt.at[0].add(1e-9)), (Xt.at[2, 1].add(1e-9), yt), (Xt[:5], yt[:5])):
        with pytest.raises(ValueError, match=r"holds chunks of a different sweep.*test = "):
            gf.sweep(X, y, test=other, **kw)
    with pytest.raises(ValueError, match=r"holds chunks of a different sweep.*test = "):
        gf.sweep(X, y, **kw)
    assert calls == []


def test_bad_test_sets(data, test_set):
    X, y = data
    Xt, yt = test_set
    kw = dict(widths=(3,), depths=(1,), seeds=(0,), lrs=(0.1,), steps=2, progress=False)
    with pytest.raises(TypeError, match="`test` must be a pair"):
        gf.sweep(X, y, test=Xt, **kw)
    with pytest.raises(ValueError, match=r"in `test=\(X_test, y_test\)`.*3 columns"):
        gf.sweep(X, y, test=(Xt[:, :3], yt), **kw)
    with pytest.raises(ValueError, match=r"in `test=\(X_test, y_test\)`: `y` has shape"):
        gf.sweep(X, y, test=(Xt, yt[:4]), **kw)
    with pytest.raises(TypeError, match=r"in `test=\(X_test, y_test\)`.*dtype"):
        gf.sweep(X, y, test=(Xt.astype(jnp.float32), yt.astype(jnp.float32)), **kw)
    with pytest.raises(ValueError, match="reads the test sites"):
        gf.sweep(X, y, observables=("loss", "test_loss"), **kw)


@pytest.mark.parametrize("engine", [gf.Weights(), gf.Collective()])
def test_batch_size_axis_equals_simulate_with_the_batch_key(data, test_set, engine):
    """Every configuration of a sweep over batch sizes is `simulate(..., batch_size=B,
    key=batch_key(seed))` (B = None: full batch, as without `batch_sizes`)."""
    X, y = data
    kw = dict(widths=(3, 5), depths=(2,), seeds=(0, 1), lrs=(0.05, 0.2), steps=10,
              record_every=5, engine=engine, test=test_set, progress=False)
    res = gf.sweep(X, y, batch_sizes=[None, 4, 10], **kw)
    assert res.batch_sizes == (None, 4, 10)
    assert res.loss.shape == (1, 2, 2, 2, 3, 3)
    assert res.dims["loss"] == ("depth", "width", "seed", "lr", "batch_size", "record")
    assert res.dims["first_nonfinite"] == ("depth", "width", "seed", "lr", "batch_size")
    assert res.dims["gradient_noise"][-2:] == ("record", "statistic")
    noise = res.observables["gradient_noise"]
    assert np.all(noise[..., 0, :, 0] == 0)  # full batch (counted as B = P): no noise
    assert np.all(noise[..., 2, :, 0] == 0)  # B = P: no noise either
    assert np.all(noise[..., 1, 1:, 0] > 0)
    full = gf.sweep(X, y, **kw)  # no batch_sizes: no axis, the full-batch entry
    assert full.batch_sizes is None and "gradient_noise" not in full.observables
    assert rel_err(res.observables["r"][..., 0, :, :], full.observables["r"]) <= 1e-12
    for j, s_i, r_i, b_i in ((0, 1, 0, 1), (1, 0, 1, 2), (1, 1, 0, 1), (0, 0, 1, 0)):
        w, seed, lr, B = (3, 5)[j], (0, 1)[s_i], (0.05, 0.2)[r_i], (None, 4, 10)[b_i]
        net = gf.ReLUNet.init(jax.random.key(seed), 4, (w, w))
        sgd = {} if B is None else dict(batch_size=B, key=gf.batch_key(seed))
        traj = gf.simulate(net, X, y, steps=10, lr=lr, record_every=5, engine=engine,
                           test=test_set, **sgd)
        at = (0, j, s_i, r_i, b_i)
        assert rel_err(res.observables["r"][at], traj.r) <= 1e-12
        assert rel_err(res.loss[at], traj.loss) <= 1e-12
        assert rel_err(res.observables["test_loss"][at], traj.observables["test_loss"]) <= 1e-12
        if B is not None:
            assert rel_err(noise[at], traj.observables["gradient_noise"]) <= 1e-12
    key = gf.batch_key(3)
    assert np.array_equal(jax.random.key_data(key), jax.random.key_data(
        jax.random.fold_in(jax.random.key(3), 0xBA7C4)))


def test_batch_sizes_compile_once_each_and_do_not_retrace(data):
    """One program per (bucket, batch size) — the index arrays of each batch size have
    their own shape — and an identical second call traces nothing."""
    X, y = data
    traces = []

    def counted(view):
        traces.append(view.r.shape)
        return jnp.sum(view.H[0])

    kw = dict(widths=(3, 5), depths=(1,), seeds=(0, 1), lrs=(0.05,), steps=4,
              observables={"h": counted}, batch_sizes=(None, 2, 5), progress=False,
              max_padding=0.0)  # two buckets × three batch sizes
    first = gf.sweep(X, y, **kw)
    n = len(traces)
    assert n >= 1
    second = gf.sweep(X, y, **kw)
    assert len(traces) == n
    assert np.array_equal(first.observables["h"], second.observables["h"])
    assert first.observables["h"].shape == (1, 2, 2, 1, 3, 5)


def test_batch_sweep_resumes_and_reloads(data, tmp_path, monkeypatch, fixed_cost):
    X, y = data
    kw = dict(widths=(3, 5), depths=(1,), seeds=(0, 1), lrs=(0.1,), steps=6, record_every=3,
              progress=False, batch_sizes=[None, 3], max_bytes=3 * PER)
    reference = gf.sweep(X, y, **kw)
    real, computed = sweep_module._run_chunk, []

    def interrupted(*args):
        if len(computed) == 2:
            raise KeyboardInterrupt
        computed.append(args)
        return real(*args)

    monkeypatch.setattr(sweep_module, "_run_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gf.sweep(X, y, out=tmp_path, **kw)
    names = sorted(p.name for p in tmp_path.glob("depth*.json"))
    assert len(names) == 2 and all("_batch" in name for name in names)
    meta = json.loads((tmp_path / names[0]).read_text())
    assert {"width", "seed", "lr", "batch_size"} == set(meta["configs"][0])
    assert meta["config"]["batch_sizes"] == [None, 3]
    monkeypatch.setattr(sweep_module, "_run_chunk", real)
    resumed = gf.sweep(X, y, out=tmp_path, **kw)
    assert np.array_equal(resumed.loss, reference.loss)
    back = gf.SweepResult.load(tmp_path)
    assert back.batch_sizes == (None, 3) and back.dims == resumed.dims
    assert np.array_equal(back.observables["gradient_noise"],
                          resumed.observables["gradient_noise"])
    with pytest.raises(ValueError, match=r"different sweep.*batch_sizes = \[null, 3\] there, "
                                         r"\[null, 4\] now"):
        gf.sweep(X, y, out=tmp_path, **{**kw, "batch_sizes": [None, 4]})
    with pytest.raises(ValueError, match=r"different sweep.*batch_sizes"):
        gf.sweep(X, y, out=tmp_path, **{**kw, "batch_sizes": None})


def test_memory_estimate_counts_the_batches(data, monkeypatch):
    """The per-configuration estimate is read off each (bucket, batch size) program, its
    `(steps, B)` index array among the inputs."""
    X, y = data
    seen = []
    real = sweep_module.working_bytes
    monkeypatch.setattr(sweep_module, "_COST", {})
    monkeypatch.setattr(sweep_module, "working_bytes",
                        lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    gf.sweep(X, y, widths=(3,), depths=(1,), seeds=(0,), lrs=(0.1,), steps=20,
             batch_sizes=[None, 8], progress=False)
    assert len(seen) == 2 and seen[0] is None and seen[1].shape == (1, 20, 8)


def test_bad_batch_sizes(data):
    X, y = data
    kw = dict(widths=(3,), depths=(1,), seeds=(0,), lrs=(0.1,), steps=2, progress=False)
    for bad, error, match in (([11], ValueError, (r"`batch_sizes` entries must be in \[1, P\] "
                                                  r"= \[1, 10\].*got 11")),
                              ([0], ValueError, r"`batch_sizes` entries must be in \[1, P\]"),
                              ([-2], ValueError, r"`batch_sizes` entries must be in \[1, P\]"),
                              ([True], TypeError, "`batch_sizes` entries must be ints or None"),
                              ([2.5], TypeError, "`batch_sizes` entries must be ints or None"),
                              ([], ValueError, "`batch_sizes` must be non-empty"),
                              ([4, 4], ValueError, "`batch_sizes` lists a batch size twice"),
                              (4, TypeError, "`batch_sizes` must be a sequence")):
        with pytest.raises(error, match=match):
            gf.sweep(X, y, batch_sizes=bad, **kw)
    with pytest.raises(ValueError, match="'gradient_noise' describes mini-batch steps"):
        gf.sweep(X, y, observables=("loss", "gradient_noise"), **kw)
