"""lte: train networks from scratch with parallel low-rank adapters on a parameter server."""

import os

# Intel MKL's float results may differ in the last bit with the alignment of their buffers, which
# differs between processes: a sync job over the network would then stop equalling lte-sim bit for
# bit (tests/test_fleet.py, room 1). Strict conditional numerical reproducibility fixes that for
# the GEMMs and keeps the fastest code path; a user's own MKL_CBWR wins. Read at MKL's first call.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from lte.common.job.version import __version__  # noqa: E402, F401 (after MKL_CBWR: nothing here imports torch)
