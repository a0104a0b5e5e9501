"""Layers 3 and 4: functional ops on the C ABI, their autograd and their registration.

Each module holds one op family: the raw calls (write into buffers the caller passes, any
__dlpack__ producer); the bodies that allocate outputs and call them, registered as the
``torch.ops.llama3_kernels.*`` kernels; one setup_context / backward pair per op, shared by
the registered autograd and the eager autograd.Function; and the public functions, which run
the bodies directly in eager mode and the registered ops when traced (``_registry.py``).
"""
