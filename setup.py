"""Only the compiled codec lives here; everything else is in pyproject.toml."""
from Cython.Build import cythonize
from setuptools import Extension, setup

codec = Extension(
    "spicewire._codec",
    sources=["spicewire/_codec.pyx"],
    include_dirs=["spicewire"],
    extra_compile_args=["-O3"],
)

setup(
    ext_modules=cythonize(
        [codec],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
