"""The model: `Layer` (one hidden layer: weight, gain, skip, mask) and `ReLUNet` (a stack of
layers under a fixed readout, with its own forward pass and parametrizations).

Everything public here is re-exported from `gramflow`; import it from there.
"""
