# tether/_ffi.py: loads libtether through cffi (ABI mode).
#
# The build (maturin, bindings = "cffi") generates tether/_native/: ffi.py, the declarations of tether.h, and
# lib_native.so, libtether built from crates/tether-ffi. When TETHER_LIB_DIR is set, the libtether.so in that
# directory is loaded instead (the same declarations), e.g. to test the package against a prebuilt library.
import importlib.util
import os

__all__ = ["ffi", "lib", "library_path", "text"]


def _load():
    lib_dir = os.environ.get("TETHER_LIB_DIR")
    if not lib_dir:
        from ._native import ffi, lib  # noqa: PLC0415 (generated at build time)

        native = importlib.util.find_spec(__name__.rpartition(".")[0] + "._native")
        path = os.path.join(native.submodule_search_locations[0], "lib_native.so")
        return ffi, lib, path
    # Load the generated declarations alone: importing tether._native would also dlopen the bundled library.
    native = importlib.util.find_spec(__name__.rpartition(".")[0] + "._native")
    if native is None or not native.submodule_search_locations:
        raise ImportError("tether._native is missing: install the package (pip install ./python) to build it")
    decl_path = os.path.join(native.submodule_search_locations[0], "ffi.py")
    spec = importlib.util.spec_from_file_location(native.name + ".ffi", decl_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = os.path.join(lib_dir, "libtether.so")
    return module.ffi, module.ffi.dlopen(path), path


ffi, lib, library_path = _load()


def text(ptr) -> str:
    """A library-owned C string (UTF-8, NUL-terminated) copied into a Python str; NULL gives ""."""
    if ptr == ffi.NULL:
        return ""
    return ffi.string(ptr).decode("utf-8", "replace")
