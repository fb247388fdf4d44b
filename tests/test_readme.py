"""The README's example runs as written, and CI runs exactly the README's test command."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(marker, lang):
    match = re.search(re.escape(marker) + r"\s*```" + lang + r"\n(.*?)```", README, re.S)
    assert match, f"no ```{lang} block after {marker} in README.md"
    return match.group(1)


def test_usage_example_runs():
    code = _block_after("<!-- example: usage -->", "python")
    namespace = {}
    exec(compile(code, "README.md:usage", "exec"), namespace)
    assert namespace["report"].ok()
    assert namespace["K"].shape == (8, 32, 32)


def test_simulate_example_runs():
    code = _block_after("<!-- example: simulate -->", "python")
    namespace = {}
    exec(compile(code, "README.md:simulate", "exec"), namespace)
    assert float(namespace["fields"].observables["closure_error"].max()) < 1e-10
    assert float(namespace["fields"].loss[-1]) < float(namespace["fields"].loss[0])
    assert namespace["sgd"].observables["gradient_noise"].shape == (11, 2)


def test_structure_example_runs():
    code = _block_after("<!-- example: structure -->", "python")
    namespace = {}
    exec(compile(code, "README.md:structure", "exec"), namespace)
    net, traj = namespace["net"], namespace["traj"]
    assert float(traj.loss[-1]) < float(traj.loss[0])
    assert namespace["sens"].gains.shape == (4, 2, 3)
    assert bool(namespace["fp"].converged)
    # Masked-out weights have exactly zero gradient.
    import jax.numpy as jnp

    g = namespace["grads"].weights[1]
    assert float(jnp.abs(jnp.where(net.masks[1].array, 0.0, g)).max()) == 0.0


def test_sweep_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _block_after("<!-- example: sweep -->", "python")
    namespace = {}
    exec(compile(code, "README.md:sweep", "exec"), namespace)
    assert namespace["res"].loss.shape == (2, 3, 3, 2, 11)
    drift = namespace["drift"]
    assert bool((drift[:, 0] > drift[:, -1]).all())
    assert (tmp_path / "sweep-chunks").is_dir()


def test_ci_runs_the_readme_test_command():
    command = _block_after("<!-- test-command -->", "bash").strip()
    ci = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--print-command"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert ci.stdout.strip() == command
    assert "pytest" in command and ".venv" in command
