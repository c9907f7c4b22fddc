"""gptfast's Triton kernels, one file per op (`attention.py`, `layer_norm.py`, ...); installed as
`gptfast.kernels` (setup.py maps this folder there: nothing named `kernels` lands in site-packages).

Each file holds its `@triton.jit` kernels, the launcher that checks inputs and picks block sizes,
and the `autograd.Function`. They never import the model; `gptfast.ops.triton_ops` adapts them
to the dispatch layer. Importing this package does not import triton.
"""
