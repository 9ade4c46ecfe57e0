"""gptlab: reproduce GPT-2 from scratch, as a tool.

Importing the package is cheap: torch is imported only by the modules that need it.
"""

import os

# Intel MKL picks matmul code paths by memory alignment, so two runs of the same training can differ
# in the last bits. Conditional numerical reproducibility makes a resumed CPU run bit-identical to an
# unbroken one, for a few percent of speed. It must be set before MKL's first call; a user's own
# setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
