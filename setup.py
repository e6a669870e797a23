"""Build spamkern and its extension ``spamkern._C``.

The C++ (CPU, OpenMP) part is built whenever torch is importable; the CUDA part only when
nvcc and a CUDA build of torch are both present. Overrides:

* ``SPAMKERN_BUILD_EXT=0``   build no extension at all (pure Python + Triton install);
  ``=1`` makes a failed extension build an error (by default the install goes on without it);
* ``SPAMKERN_BUILD_CUDA=0/1`` force the CUDA part off / on;
* ``SPAMKERN_CUDA_ARCHS``    e.g. ``"80;90"`` (default: 80 and 90);
* ``SPAMKERN_DEBUG_BUILD=1``  keep debug symbols (``-g``, no strip); by default the extension
  is linked stripped (``-s``), which takes ``_C`` from about 7.5 MB to well under 1 MB.

torch is imported here, so install with ``pip install --no-build-isolation .`` — an
isolated build would download a second torch just to compile against it.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

REQUIRES = [
    "torch>=2.4",
    "numpy",
    "scipy",
    "threadpoolctl",
    "tqdm",
    "scikit-learn",
    "matplotlib",
    "torch-pruning>=1.6,<2",
]
EXTRAS = {
    "triton": ["triton>=3.0"],
    # laplace-torch 0.3 pins torchvision through its dependencies; install it with
    # `pip install --no-deps laplace-torch==0.3` plus these (see README "Installing").
    "laplace": [
        "laplace-torch==0.3",
        "asdfghjkl==0.1a4",
        "backpack-for-pytorch",
        "curvlinops-for-pytorch>=3.0.1",
        "unfoldNd",
        "einconv",
        "scipy",
        "opt-einsum",
        "einops",
        "torchmetrics",
        "linear_operator",
    ],
    "test": ["pytest", "pytest-benchmark", "ruff"],
    "bench": ["pytest", "pytest-benchmark"],
}


def _extensions():
    if os.environ.get("SPAMKERN_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("spamkern: torch not importable at build time; building without spamkern._C")
        return [], {}

    cpu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    # csrc/cuda: torch-free kernels (*.cu, compile-checked with nvcc alone) and their torch
    # glue (*.cpp), both only built with a CUDA torch.
    cuda_dir = ROOT / "csrc" / "cuda"
    cuda_sources = sorted(
        str(p.relative_to(ROOT)) for p in [*cuda_dir.glob("*.cu"), *cuda_dir.glob("*.cpp")]
    )
    if not cpu_sources:
        return [], {}

    want_cuda = os.environ.get("SPAMKERN_BUILD_CUDA")
    has_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    build_cuda = has_cuda if want_cuda is None else want_cuda == "1"
    if build_cuda and not has_cuda:
        raise RuntimeError(
            "SPAMKERN_BUILD_CUDA=1 but no CUDA toolkit with a CUDA build of torch was found "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})"
        )

    cxx_flags = ["-O3", "-fopenmp", "-march=x86-64-v2"]
    if os.uname().machine != "x86_64":
        cxx_flags.remove("-march=x86-64-v2")
    include_dirs = [str(ROOT / "csrc")]
    link_flags = ["-fopenmp"]
    if os.environ.get("SPAMKERN_DEBUG_BUILD") == "1":
        cxx_flags += ["-g", "-O1"]
    else:
        cxx_flags += ["-g0"]
        link_flags += ["-s"]  # a release build: strip the symbol tables from _C
    if build_cuda:
        archs = os.environ.get("SPAMKERN_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        nvcc_flags = ["-O3", "-std=c++17", "-lineinfo"]
        for arch in filter(None, (a.strip() for a in archs)):
            nvcc_flags += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
        ext = cpp_extension.CUDAExtension(
            "spamkern._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("SPAMKERN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "spamkern._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """A failed compile leaves spamkern installable: it then runs its torch/Triton code
        and says so once at import (spamkern/_ext.py). SPAMKERN_BUILD_EXT=1 makes it fatal."""

        failed: set[str] = set()

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as err:
                if os.environ.get("SPAMKERN_BUILD_EXT") == "1":
                    raise
                self.failed.add(extension.name)
                print(
                    f"spamkern: WARNING: building {extension.name} failed ({err}); installing "
                    "without it (set SPAMKERN_BUILD_EXT=1 to make this an error)"
                )

        def copy_extensions_to_source(self):  # --inplace: skip what failed to build
            built = self.extensions
            self.extensions = [e for e in built if e.name not in self.failed]
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = built

    build_ext = OptionalBuildExt.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    name="spamkern",
    version="0.1.0",
    description="Fast Laplace marginal-likelihood training and OPD pruning (SpaM), "
    "with fused kernels and block-sparse inference",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["spamkern", "spamkern.*"]) + ["spamkern.kernels"],
    package_dir={"spamkern.kernels": "kernels"},
    # measured per-card data of the sparse layers (decision tables, tuned Triton configs)
    package_data={"spamkern": ["py.typed"], "spamkern.sparse": ["measured/*.json"]},
    license="MIT",
    install_requires=REQUIRES,
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["spamkern=spamkern.cli:main"]},
    zip_safe=False,
)
