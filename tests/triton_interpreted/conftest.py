"""Run Triton's interpreter (CPU tensors, NumPy underneath) before anything imports Triton."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
