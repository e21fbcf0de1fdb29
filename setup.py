"""Only the compiled codec lives here; everything else is in pyproject.toml.

The extension is optional: spicewire ships a pure-Python codec (`_codec_py.py`) that behaves
identically, so a machine without Cython or a C compiler still installs, with one warning line, and
`spicewire.codec.BACKEND` says "python".
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

try:
    from Cython.Build import cythonize
except ImportError:  # OptionalBuildExt says so, once, when it would have built the extension
    cythonize = None


def warn(why: str) -> None:
    print(f"WARNING: spicewire: {why}; installing the pure-Python codec instead (slower)", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """Builds the codec when it can; any failure to compile or link leaves the pure twin in charge."""

    def finalize_options(self) -> None:
        super().finalize_options()
        for ext in self.extensions:
            # So an editable install does not go looking for a module that was not built. Set here
            # because cythonize() hands back new Extension objects without the flag.
            ext.optional = True

    def build_extension(self, ext: Extension) -> None:
        if cythonize is None:
            # Said here, not where setup.py checks: pip runs setup.py once for the metadata and once
            # for the build, and only the build runs this.
            warn("Cython is not installed, so the compiled codec cannot be built")
            return
        try:
            super().build_extension(ext)
        except (CCompilerError, ExecError, PlatformError, OSError) as err:  # no compiler, a broken one, no headers
            first_line = str(err).splitlines()[0] if str(err) else ""
            warn(f"cannot build {ext.name} ({type(err).__name__}: {first_line[:200]})")


def extensions() -> list[Extension]:
    codec = Extension(
        "spicewire._codec",
        sources=["spicewire/_codec.pyx"],
        include_dirs=["spicewire"],
        # -g0 and -s: the debug info grew the module from about 230 KB to 1.45 MB, and nobody steps
        # through generated C in a debugger.
        extra_compile_args=["-O3", "-g0"],
        extra_link_args=["-s"],
    )
    if cythonize is None:
        return [codec]
    return cythonize(
        [codec],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
