"""The fields of a network on its training set and what they imply: forward and conjugate
fields (`state`), layer kernels (`kernels`, `matvec`), field velocities (`velocities`), the
weight-induced operator hierarchy (`operators`) and the check of all of them against autodiff
(`verify`). Pure functions of a `ReLUNet` and data; no time stepping.

Everything public here is re-exported from `gramflow`; import it from there.
"""
