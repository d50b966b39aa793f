"""The gateway's one compiled module: the window features in one call (optional: numpy serves without it)."""

import numpy as np
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gateway.pipeline._features",
            ["gateway/pipeline/_features.c"],
            include_dirs=[np.get_include()],
            # No fused multiply-add: the features must equal the numpy pass's to the bit.
            extra_compile_args=["-O2", "-ffp-contract=off", "-fno-fast-math"],
            optional=True,
        )
    ]
)
