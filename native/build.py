"""cffi builder for clusterfs._native.

Every `native/*.h` holds plain declarations that cffi can parse (no preprocessor
lines); they are concatenated into the cdef. Every `native/*.c` is compiled into
the one extension module. Adding a C part means dropping a .c/.h pair here.
"""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADERS = sorted(HERE.glob("*.h"))
SOURCES = sorted(HERE.glob("*.c"))

ffibuilder = FFI()
ffibuilder.cdef("\n".join(h.read_text() for h in HEADERS))
ffibuilder.set_source(
    "clusterfs._native",
    "#include <stddef.h>\n#include <stdint.h>\n"
    + "\n".join(f'#include "{h.name}"' for h in HEADERS),
    sources=[str(s.relative_to(HERE.parent)) for s in SOURCES],
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
