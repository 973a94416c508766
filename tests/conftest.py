import os

# Triton kernels run on CPU tensors through the interpreter; the flag must be set before triton is
# imported anywhere in the session.
os.environ.setdefault("TRITON_INTERPRET", "1")
