"""Layers 3 and 4: functional ops on the C ABI and their autograd Functions.

Each module holds one op family: the raw calls (write into buffers the caller
passes, any __dlpack__ producer), the torch-facing functional op that
allocates outputs, and the autograd Function whose backward runs the
library's backward kernel.
"""
