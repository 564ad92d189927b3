"""Build hook for the optional C batch kernel (workers/_kernel). Metadata lives in pyproject.toml."""

from setuptools import setup

ext_modules: list = []
try:
    from workers._kernel.build import extension  # the kernel's own build description
except ImportError:  # the kernel is not in this tree yet
    pass
else:
    ext_modules.append(extension())

setup(ext_modules=ext_modules)
