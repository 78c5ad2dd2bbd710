"""Builds the Cython dispatch core; all metadata lives in pyproject.toml."""
from Cython.Build import cythonize
from setuptools import Extension, setup

dispatch = Extension(
    "poolme_mp._dispatch",
    sources=["src/poolme_mp/_dispatch.pyx"],
    include_dirs=["src/poolme_mp"],
    extra_compile_args=["-O2"],
)

setup(
    ext_modules=cythonize(
        [dispatch],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )
)
