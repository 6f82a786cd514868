import sys
import warnings

from setuptools import find_packages, setup


def extension_build():
    """The compiled half (csrc/, the "cpp" backend) as (ext_modules, cmdclass).

    Without torch's build helpers, a compiler or a working build, installation
    still succeeds and the package runs on the pure-PyTorch eager backend
    (presam_kernels.extension_available() says which)."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch not importable at build time (build isolation without torch)
        warnings.warn(f"presam-kernels: building without the C++ extension ({exc}); the eager backend runs instead")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Build the extension if the compiler does; warn instead of failing otherwise."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                self._skip(exc)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                self._skip(exc)

        @staticmethod
        def _skip(exc):
            message = (
                f"presam-kernels: the C++ extension did not build ({type(exc).__name__}: {exc}); "
                "installing without it, the eager backend runs instead"
            )
            warnings.warn(message)
            print(message, file=sys.stderr)

    # AVX2 + FMA + F16C, the level torch's own CPU kernels dispatch to on this
    # class of machine; the package loads the library only on a CPU that has
    # AVX2 (presam_kernels/_extension.py), so no -march=native.
    vector_flags = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    extension = CppExtension(
        "presam_kernels._C",
        ["csrc/ops.cpp", "csrc/host.cpp"],
        # No FMA contraction: every variant rounds the same expression the same way
        # (infoSAM's first step is SAM bit for bit), whatever the compiler inlines.
        extra_compile_args=["-O3", "-ffp-contract=off", "-fopenmp", "-Wno-unknown-pragmas", *vector_flags],
        extra_link_args=["-fopenmp"],  # at::parallel_for is OpenMP, inlined from the headers
    )
    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()

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
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    extras_require={
        # Triton is optional at import time; CUDA builds of torch already ship it.
        # Tested: 3.6.0 (make test) and 3.9.0 (make test-triton-next).
        "triton": ["triton>=3.6,<3.10"],
        # The comparison job (python -m presam_kernels compare).
        "compare": ["numpy", "scikit-learn", "matplotlib", "tqdm"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "numpy"],
    },
)
