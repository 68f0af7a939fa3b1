import os

import torch

if not torch.cuda.is_available():
    # these tests import the kernels (and so triton); the interpreter flag must be set before
    # the first `import triton` of the session, or later Triton tests on CPU would be skipped
    os.environ.setdefault("TRITON_INTERPRET", "1")
