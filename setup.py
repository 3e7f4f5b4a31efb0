"""esvit_scale: install with `make setup` (creates .venv, installs torch first, then this package)."""
from setuptools import find_packages, setup


def kernel_extensions():
    """The C++/CUDA extensions of kernels/ (filled in by the kernels build; none yet)."""
    return [], {}


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
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "test": ["pytest"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
