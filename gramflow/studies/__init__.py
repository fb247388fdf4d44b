"""Studies built on the dynamics: built-in data (`data`), closure hierarchies (`closure`),
balance laws, fixed points, spectral sensitivity, robustness and the structure study (exposed
as `gramflow.diagnostics`), and figures (`plots`, needs matplotlib).

Everything public here is re-exported from `gramflow` or `gramflow.diagnostics`.
"""
