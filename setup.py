"""esvit_scale: install with `make setup` (creates .venv, installs torch first, then this package)."""
from setuptools import find_packages, setup


def kernel_extensions():
    """One extension module, esvit_scale._C, from kernels/csrc (see kernels/README.md).

    A CUDAExtension when nvcc and a CUDA build of torch are present, else a CppExtension (CPU kernels only).
    ESVIT_CPU_ONLY_BUILD=1 forces the CppExtension (fast rebuilds while working on the CPU code);
    ESVIT_NO_AVX2=1 drops -mavx2 -mfma on x86_64 (for CPUs older than Haswell).
    """
    import glob
    import os
    import platform
    import shutil

    try:  # torch is imported lazily so that `setup.py --help` works without it
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}

    root = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join("kernels", "csrc")
    cpp_sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(csrc, "*.cu")))
    # no FP traps: lets gcc vectorise exp; fp-contract: FMA also under -std=c++20
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-ffp-contract=fast"]
    if platform.machine() in ("x86_64", "AMD64") and os.environ.get("ESVIT_NO_AVX2") != "1":
        cxx_flags += ["-mavx2", "-mfma"]
    include_dirs = [os.path.join(root, csrc)]
    with_cuda = (os.environ.get("ESVIT_CPU_ONLY_BUILD") != "1" and torch.version.cuda is not None
                 and (cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None))
    if not with_cuda:
        ext = cpp_extension.CppExtension(
            "esvit_scale._C", cpp_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
        return [ext], {"build_ext": cpp_extension.BuildExtension}

    # No GPU to detect at build time: A100, H100/H200, and B200/GB200 (sm_100) with its PTX, which newer GPUs JIT.
    arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0;10.0+PTX")
    try:  # the toolkit here lacks some library headers (cusparse.h ...); torch's nvidia wheels carry them
        import nvidia
        include_dirs += [p for p in (os.path.join(d, "cu13", "include") for d in nvidia.__path__) if os.path.isdir(p)]
    except ImportError:
        pass
    # libcudart.so to link against: CUDA_HOME is the folder above nvcc's bin/ (here /usr/local), which need not
    # hold the toolkit's lib/; look in the usual toolkit folders too.
    cuda_home = cpp_extension.CUDA_HOME or os.path.dirname(os.path.dirname(shutil.which("nvcc")))
    candidates = [os.path.join(cuda_home, d) for d in ("lib64", "lib", "targets/x86_64-linux/lib")]
    candidates += sorted(glob.glob("/usr/local/cuda*/lib64")) + sorted(glob.glob("/usr/local/cuda*/lib"))
    library_dirs = [d for d in candidates if os.path.exists(os.path.join(d, "libcudart.so"))][:1]
    ext = cpp_extension.CUDAExtension(
        "esvit_scale._C", cpp_sources + cuda_sources, include_dirs=include_dirs, library_dirs=library_dirs,
        define_macros=[("ESVIT_WITH_CUDA", None), ("ESVIT_CUDA_ARCHS", cuda_arch_token(arch_list))],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
        extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension}


def cuda_arch_token(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST as one C identifier for the extension to report ("8.0;9.0;10.0+PTX" ->
    "sm80_sm90_sm100_ptx100"): quotes and semicolons do not survive the compiler command lines."""
    parts = []
    for entry in arch_list.replace(" ", ";").split(";"):
        if entry:
            number = entry.split("+")[0].replace(".", "")
            parts += [f"sm{number}"] + ([f"ptx{number}"] if entry.upper().endswith("+PTX") else [])
    return "_".join(parts)


ext_modules, cmdclass = kernel_extensions()

setup(
    name="esvit_scale",
    version="0.1.0",
    description="EsViT self-supervised Swin pretraining at scale: DeepSpeed ZeRO, fused kernels, DALI",
    packages=find_packages(include=["esvit_scale", "esvit_scale.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "deepspeed>=0.19",
        "timm>=1.0.20",
        "pyyaml",
        "tensorboard",
        "numpy",
        "pillow",
        "matplotlib",            # the scaling plot (python -m esvit_scale.bench scaling)
        "scikit-learn",          # ships the quickstart's real images (its bundled digits)
        "scikit-image",          # ships real photographs (python -m esvit_scale.data.photos)
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "test": ["pytest"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
