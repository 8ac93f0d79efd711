"""cffi builder for lightclient._shim (API mode), used by setup.py's cffi_modules.

Build-time switches (environment of the *build*, never read by the library):
  LIGHTCLIENT_NO_ENGINE=1   compile the ENGINE backend out, as on OpenSSL 4 / RHEL 10
  LIGHTCLIENT_SANITIZE=1    build with AddressSanitizer and UndefinedBehaviorSanitizer
"""
import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent


def _rel(path: pathlib.Path) -> str:
    # cffi (and setuptools) want sources relative to the project root, where the build runs.
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


ffibuilder = FFI()
ffibuilder.cdef((HERE / "lc_shim.h").read_text())

_macros = []
_cflags = ["-Wall", "-Wextra", "-Wno-unused-parameter"]
_ldflags = []
if os.environ.get("LIGHTCLIENT_NO_ENGINE") == "1":
    _macros.append(("OPENSSL_NO_ENGINE", "1"))
if os.environ.get("LIGHTCLIENT_SANITIZE") == "1":
    _cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    _ldflags += ["-fsanitize=address,undefined"]

ffibuilder.set_source(
    "lightclient._shim",
    '#include <stddef.h>\n#include <stdint.h>\n#include "lc_shim.h"\n',
    sources=[_rel(HERE / "lc_shim.c")],
    include_dirs=[_rel(HERE)],
    libraries=["ssl", "crypto", "dl", "pthread"],
    define_macros=_macros,
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
    depends=[_rel(HERE / "lc_shim.h")],
    py_limited_api=False,  # the PyObject_HEAD offset must come from this very interpreter
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
