"""The ctypes declarations of ``_lib`` agree with the C header ``capi/l3k.h``.

(a) Every ``L3K_API`` function of the header is in ``_lib._SIGNATURES`` with as many
    parameters, each of a compatible ctypes type, and a compatible restype; and every name in
    ``_SIGNATURES`` is declared in the header.
(b) Every struct mirrored in ``_lib.STRUCTS`` has the header's fields in order, with the same
    names and compatible types; a field whose type is a struct of the header that is not
    mirrored on its own (DLDataType) may be spelled out in place as ``<field>_<member>``.

A wrong argtype does not fail loudly at run time: ctypes converts what it is given and the C
side reads garbage.  So the comparison is strict, and a doctored header shows that it fails.

The header is read with a small parser that knows this header's C: typedef'd structs and
enums, ``L3K_API`` declarations, fixed-width integer types.  ``_lib`` is loaded straight from
its file, so the test needs the shared library but not torch.
"""

from __future__ import annotations

import ctypes
import importlib.util
import re
from pathlib import Path

import pytest

HEADER = Path(__file__).resolve().parents[2] / "capi" / "l3k.h"

SCALARS = {
    "float": ctypes.c_float,
    "double": ctypes.c_double,
    "char": ctypes.c_char,
    "int": ctypes.c_int,
    "unsigned": ctypes.c_uint,
    "unsigned int": ctypes.c_uint,
    "long": ctypes.c_long,
    "unsigned long": ctypes.c_ulong,
    "long long": ctypes.c_longlong,
    "size_t": ctypes.c_size_t,
    "int8_t": ctypes.c_int8,
    "uint8_t": ctypes.c_uint8,
    "int16_t": ctypes.c_int16,
    "uint16_t": ctypes.c_uint16,
    "int32_t": ctypes.c_int32,
    "uint32_t": ctypes.c_uint32,
    "int64_t": ctypes.c_int64,
    "uint64_t": ctypes.c_uint64,
}
_QUALIFIERS = {"const", "volatile", "struct", "enum"}
_TYPE_WORDS = {"void", "char", "short", "int", "long", "float", "double", "signed", "unsigned"}


# ---- the parser ------------------------------------------------------------------------------


class CType:
    """A parsed C type: its base name (no qualifiers) and whether it is a pointer."""

    def __init__(self, base: str, pointer: bool):
        self.base, self.pointer = base, pointer

    def __repr__(self):
        return self.base + (" *" if self.pointer else "")


class Header:
    """Functions, structs and enums of a C header's text."""

    def __init__(self, text: str):
        text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
        text = re.sub(r"//[^\n]*", " ", text)
        text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        self.enums = set(re.findall(r"typedef\s+enum\s*\w*\s*\{[^}]*\}\s*(\w+)\s*;", text))
        self.structs: dict[str, list[tuple[str, CType]]] = {}
        for body, name in re.findall(r"typedef\s+struct\s*\w*\s*\{([^}]*)\}\s*(\w+)\s*;", text):
            self.structs[name] = self._fields(body)
        self.functions: dict[str, tuple[CType, list[CType]]] = {}
        for ret, name, params in re.findall(r"\bL3K_API\s+([^;(]*?)\b(\w+)\s*\(([^)]*)\)\s*;", text):
            self.functions[name] = (self._type(ret), self._params(params))

    def _is_type_word(self, word: str) -> bool:
        return word in _TYPE_WORDS or word in SCALARS or word in self.enums or word in self.structs

    def _type(self, decl: str, named: bool = False) -> CType:
        """The type of a declaration `decl`; `named`: its last word may be a name to drop."""
        pointer = "*" in decl
        words = [w for w in re.findall(r"\w+", decl) if w not in _QUALIFIERS]
        if named and len(words) > 1 and not self._is_type_word(words[-1]):
            words = words[:-1]
        if not words:
            raise ValueError(f"cannot read a type from {decl!r}")
        return CType(" ".join(words), pointer)

    def _params(self, params: str) -> list[CType]:
        params = params.strip()
        if params in ("", "void"):
            return []
        return [self._type(p, named=True) for p in params.split(",")]

    def _fields(self, body: str) -> list[tuple[str, CType]]:
        """(name, type) per field; `T a, *b;` declares a of T and b of T *."""
        fields = []
        for decl in body.split(";"):
            decl = decl.strip()
            if not decl:
                continue
            first, *more = decl.split(",")
            m = re.match(r"(.*?)([*\s]*)(\w+)\s*$", first, flags=re.S)
            if m is None:
                raise ValueError(f"cannot read the field declaration {decl!r}")
            base = self._type(m.group(1))
            for i, declarator in enumerate([m.group(2) + m.group(3)] + more):
                name = re.findall(r"\w+", declarator)
                if len(name) != 1 or (i == 0 and not base.base):
                    raise ValueError(f"cannot read the field declaration {decl!r}")
                fields.append((name[0], CType(base.base, "*" in declarator)))
        return fields


# ---- the comparison --------------------------------------------------------------------------


def _is_pointer_type(ct) -> bool:
    return ct in (ctypes.c_void_p, ctypes.c_char_p) or (isinstance(ct, type) and issubclass(ct, ctypes._Pointer))


def _expected_scalar(header: Header, t: CType):
    """The ctypes type a non-pointer C type must have, or None if the test does not know it."""
    if t.base in header.enums:
        return ctypes.c_int  # C enums are int-sized here
    return SCALARS.get(t.base)


def _compatible(header: Header, t: CType, ct, what: str) -> list[str]:
    if t.pointer:
        if t.base == "char" and ct is ctypes.c_char_p:
            return []
        return [] if _is_pointer_type(ct) else [f"{what}: header has {t!r}, ctypes has {ct} (want a pointer type)"]
    want = _expected_scalar(header, t)
    if want is None:
        return [f"{what}: the header's type {t!r} is unknown to this test (add it to SCALARS)"]
    return [] if ct is want else [f"{what}: header has {t!r} ({want.__name__}), ctypes has {ct}"]


def _expected_restype(header: Header, t: CType):
    if t.pointer:
        return ctypes.c_char_p if t.base == "char" else ctypes.c_void_p
    if t.base == "void":
        return None
    return _expected_scalar(header, t)


def check_functions(header: Header, signatures: dict, restypes: dict) -> list[str]:
    """Problems between the header's functions and (name -> argtypes, name -> restype)."""
    problems = []
    for name, (ret, params) in header.functions.items():
        if name not in signatures:
            problems.append(f"{name}: declared in the header, missing from _SIGNATURES")
            continue
        argtypes = signatures[name]
        if len(argtypes) != len(params):
            problems.append(f"{name}: {len(params)} parameters in the header, {len(argtypes)} in _SIGNATURES")
            continue
        for i, (t, ct) in enumerate(zip(params, argtypes)):
            problems += _compatible(header, t, ct, f"{name} parameter {i}")
        want, got = _expected_restype(header, ret), restypes.get(name, ctypes.c_int)
        if got is not want:
            problems.append(f"{name}: header returns {ret!r} (want restype {want}), ctypes restype is {got}")
    for name in signatures:
        if name not in header.functions:
            problems.append(f"{name}: in _SIGNATURES, not declared in the header")
    return problems


def _header_leaves(header: Header, fields, mirrored: set, prefix: str = ""):
    """The header's fields, with structs that have no mirror of their own spelled out."""
    for name, t in fields:
        if not t.pointer and t.base in header.structs and t.base not in mirrored:
            yield from _header_leaves(header, header.structs[t.base], mirrored, f"{prefix}{name}_")
        else:
            yield prefix + name, t


def _mirror_leaves(cls, mirrors: set, prefix: str = ""):
    for name, ct in cls._fields_:
        if isinstance(ct, type) and issubclass(ct, ctypes.Structure) and ct not in mirrors:
            yield from _mirror_leaves(ct, mirrors, f"{prefix}{name}_")
        else:
            yield prefix + name, ct


def check_structs(header: Header, structs: dict) -> list[str]:
    """Problems between the header's structs and the mirrors (header name -> Structure)."""
    problems = []
    mirrors = set(structs.values())
    for cname, cls in structs.items():
        if cname not in header.structs:
            problems.append(f"{cname}: mirrored in STRUCTS, no such typedef struct in the header")
            continue
        want = list(_header_leaves(header, header.structs[cname], set(structs)))
        got = list(_mirror_leaves(cls, mirrors))
        if len(want) != len(got):
            problems.append(
                f"{cname}: {len(want)} fields in the header {[n for n, _ in want]}, "
                f"{len(got)} in {cls.__name__} {[n for n, _ in got]}"
            )
            continue
        for i, ((hname, t), (pname, ct)) in enumerate(zip(want, got)):
            what = f"{cname} field {i} ({hname})"
            if hname != pname:
                problems.append(f"{what}: named {pname!r} in {cls.__name__}")
            if not t.pointer and t.base in structs:
                if ct is not structs[t.base]:
                    problems.append(f"{what}: header has {t.base}, {cls.__name__} has {ct}")
            else:
                problems += _compatible(header, t, ct, what)
    return problems


# ---- the tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lib_module():
    """_lib, loaded from its file without importing the package (which needs torch)."""
    pkg = importlib.util.find_spec("llama3_kernels")
    if pkg is None or not pkg.submodule_search_locations:
        pytest.skip("llama3_kernels is not importable")
    path = Path(list(pkg.submodule_search_locations)[0]) / "_lib.py"
    spec = importlib.util.spec_from_file_location("_l3k_lib_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def header():
    if not HEADER.exists():
        pytest.skip(f"{HEADER} not found (tests run outside the source tree)")
    return Header(HEADER.read_text())


def test_header_parses(header):
    """The parser sees the header's API: a sanity floor, so that an empty parse cannot pass."""
    assert {"l3k_version", "l3k_rmsnorm_forward", "l3k_attention_backward"} <= set(header.functions)
    assert header.functions["l3k_last_error"][1] == []
    assert [repr(t) for t in header.functions["l3k_rmsnorm_forward"][1]][:3] == ["DLTensor *", "DLTensor *", "float"]
    assert "l3k_status" in header.enums and "DLDataType" in header.structs


def test_functions_match_header(header, lib_module):
    problems = check_functions(header, lib_module._SIGNATURES, lib_module._RESTYPES)
    assert not problems, "ctypes declarations disagree with capi/l3k.h:\n  " + "\n  ".join(problems)


def test_structs_match_header(header, lib_module):
    structs = getattr(lib_module, "STRUCTS", None)
    assert isinstance(structs, dict), "_lib.STRUCTS (header struct name -> ctypes.Structure) is missing"
    problems = check_structs(header, structs)
    assert not problems, "ctypes structs disagree with capi/l3k.h:\n  " + "\n  ".join(problems)


# A small header in this file's C, and the declarations that match it.
_DOCTORED = """
#include <stdint.h>
typedef enum { A = 0 } l3k_status;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DLDataType;
typedef struct {
    size_t struct_size;      /* a comment; with, commas */
    const DLTensor *a, *b;
    int64_t n;
    float eps;
    DLDataType dtype;
} my_config;
typedef struct { int64_t rows; my_config inner; } my_outer;
L3K_API const char *f_name(l3k_status status);
L3K_API l3k_status f_run(const DLTensor *x, float eps, int64_t n, size_t *bytes,
                         unsigned flags, void *stream);
L3K_API int f_count(void);
"""


class _Config(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("a", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("dtype_code", ctypes.c_uint8),
        ("dtype_bits", ctypes.c_uint8),
        ("dtype_lanes", ctypes.c_uint16),
    ]


class _Outer(ctypes.Structure):
    _fields_ = [("rows", ctypes.c_int64), ("inner", _Config)]


_P, _F, _I64, _SZ = ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_size_t
_GOOD_SIGS = {"f_name": [ctypes.c_int], "f_run": [_P, _F, _I64, ctypes.POINTER(_SZ), ctypes.c_uint, _P], "f_count": []}
_GOOD_RES = {"f_name": ctypes.c_char_p}
_GOOD_STRUCTS = {"my_config": _Config, "my_outer": _Outer}


def _with(d: dict, **changes) -> dict:
    return {**d, **changes}


def test_doctored_header_is_caught():
    """The checks pass on matching declarations and fail, naming the culprit, on each kind of
    mismatch: a parameter type, a parameter count, a restype, a function on one side only,
    a struct field's type, order, name or count, a nested struct."""
    h = Header(_DOCTORED)
    assert set(h.functions) == set(_GOOD_SIGS)
    assert check_functions(h, _GOOD_SIGS, _GOOD_RES) == []
    assert check_structs(h, _GOOD_STRUCTS) == []

    bad_sigs = {
        "float passed as int": _with(_GOOD_SIGS, f_run=[_P, ctypes.c_int, _I64, _P, ctypes.c_uint, _P]),
        "int64 passed as int": _with(_GOOD_SIGS, f_run=[_P, _F, ctypes.c_int, _P, ctypes.c_uint, _P]),
        "pointer passed as size_t": _with(_GOOD_SIGS, f_run=[_SZ, _F, _I64, _P, ctypes.c_uint, _P]),
        "one parameter short": _with(_GOOD_SIGS, f_run=[_P, _F, _I64, _P, ctypes.c_uint]),
        "missing function": {k: v for k, v in _GOOD_SIGS.items() if k != "f_count"},
        "extra function": _with(_GOOD_SIGS, f_gone=[]),
    }
    for why, sigs in bad_sigs.items():
        problems = check_functions(h, sigs, _GOOD_RES)
        assert problems, why
    assert any("f_name" in p for p in check_functions(h, _GOOD_SIGS, {})), "const char * left as int"
    assert any("f_gone" in p for p in check_functions(h, bad_sigs["extra function"], _GOOD_RES))
    # the same declarations against a header whose function changed
    changed = Header(_DOCTORED.replace("float eps, int64_t n", "double eps, int64_t n"))
    assert any("f_run parameter 1" in p for p in check_functions(changed, _GOOD_SIGS, _GOOD_RES))

    def fields(*pairs):
        return type("_Doctored", (ctypes.Structure,), {"_fields_": list(pairs)})

    f = _Config._fields_
    bad_structs = {
        "field type": fields(*f[:3], ("n", ctypes.c_int), *f[4:]),
        "fields swapped": fields(f[0], f[2], f[1], *f[3:]),
        "field missing": fields(*f[:-1]),
        "field added": fields(*f, ("extra", ctypes.c_int)),
        "field renamed": fields(*f[:4], ("epsilon", _F), *f[5:]),
    }
    for why, cls in bad_structs.items():
        problems = check_structs(h, _with(_GOOD_STRUCTS, my_config=cls))
        assert any("my_config" in p for p in problems), why
    assert check_structs(h, _with(_GOOD_STRUCTS, my_outer=fields(("rows", _I64), ("inner", fields(*f)))))
    assert check_structs(h, {"no_such_struct": _Config})
    # a header field that changed type under unchanged mirrors
    changed = Header(_DOCTORED.replace("    float eps;", "    int eps;"))
    assert any("my_config field 4 (eps)" in p for p in check_structs(changed, _GOOD_STRUCTS))
