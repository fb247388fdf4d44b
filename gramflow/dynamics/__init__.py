"""Time evolution: optimizers as pytrees (`optimizer`), what a run records (`observables`),
engines that advance weights or fields (`engines`), single runs and flows (`simulate`), the
discrete-step remainder (`discrete`), batches of runs as one JAX function (`batch`) and the
sweep driver with chunks, resume and files (`sweep`).

Everything public here is re-exported from `gramflow`; import it from there.
"""
