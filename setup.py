from setuptools import find_packages, setup

setup(
    name="presam-kernels",
    version="0.1.0",
    description="Sharpness-aware optimizers (SAM, ASAM, infoSAM, ...) on the preSAM framework, "
    "with fused multi-tensor kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["presam_kernels", "presam_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={
        # Triton is optional at import time; CUDA builds of torch already ship it.
        # Tested: 3.6.0 (make test) and 3.9.0 (make test-triton-next).
        "triton": ["triton>=3.6,<3.10"],
        # The comparison job (python -m presam_kernels compare).
        "compare": ["numpy", "scikit-learn", "matplotlib", "tqdm"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "numpy"],
    },
)
