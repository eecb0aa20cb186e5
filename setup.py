from setuptools import find_packages, setup

setup(
    name="pipeschedule",
    version="0.1.0",
    description="Pipeline-parallel training schedules for PyTorch: 1F1B and interleaved 1F1B as plain functions",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pipeschedule", "pipeschedule.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        # The pictures are tested too. megatron-core (the oracle of tests/test_megatron.py) is
        # installed apart, with --no-deps, so it cannot pull in another torch: see the README.
        "test": ["pytest>=7", "hypothesis>=6", "matplotlib>=3.5", "packaging"],
        "plot": ["matplotlib>=3.5"],
    },
    license="BSD-3-Clause",
)
