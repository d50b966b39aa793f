"""The gateway's one compiled module: a window's features and its dense-layer score, each in one call.

Optional: where no C compiler builds it, the numpy paths serve with the same results (features to
the bit, scores within DENSE_BATCH1_TOLERANCE).
"""

import numpy as np
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gateway._window",
            ["gateway/_window.c"],
            include_dirs=[np.get_include()],
            # No fused multiply-add: the results must equal the numpy paths' operation for operation.
            extra_compile_args=["-O2", "-ffp-contract=off", "-fno-fast-math"],
            optional=True,
        )
    ]
)
