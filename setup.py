from setuptools import find_packages, setup

setup(
    name="nimplicit",
    version="0.1.0",
    description="Implicitly defined layers in plain NumPy: any forward solver, "
                "derivatives of any order by the implicit function theorem and autograd.",
    long_description=open("README.rst").read(),
    long_description_content_type="text/x-rst",
    packages=find_packages(include=["nimplicit*", "reference_layers*", "verification*"]),
    python_requires=">=3.9",
    install_requires=["numpy>=1.22", "scipy>=1.11", "autograd>=1.6", "numba>=0.57"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "scikit-image>=0.21", "scikit-learn>=1.1", "matplotlib>=3.5"],
        "examples": ["scikit-learn>=1.1", "matplotlib>=3.5", "tqdm>=4", "scikit-image>=0.21"],
        # qpth pins an old numpy: install it with `pip install --no-deps qpth`
        "bench": ["jax[cpu]", "jaxopt", "cvxpylayers", "pygmtools", "PyMCubes",
                  "scikit-image>=0.21", "tqdm>=4", "matplotlib>=3.5",
                  "torch==2.13.0"],
        "docs": ["sphinx>=7", "numpydoc>=1.6"],
        "distributed": ["dask[distributed]>=2024.1"],
    },
    entry_points={"console_scripts": ["nimplicit-gradcheck=verification.cli:main"]},
)
