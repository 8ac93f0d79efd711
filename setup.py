from setuptools import setup; setup(cffi_modules=["native/build_shim.py:ffibuilder"])  # noqa: E702 (cffi cannot be declared in setup.cfg)
