"""Tidy: rules of the code base checked over its own tracked source, in the
spirit of TigerBeetle's src/tidy.zig. No rule has an allowlist: code that
breaks one is changed, not excused.

- No function over FUNCTION_LINES_MAX lines, from its `def` (or `cdef`,
  `cpdef`) line to the last line of its body: by the ast for .py files, by
  indentation for the Cython .pyx/.pxi/.pxd files.
- No literal batch maximum outside its owner (engine/protocol/limits.py), and
  no status number outside its owner (engine/protocol/status.py). The kernel
  compiles in its copies from one file, ext/**/consts.pxi, which it checks
  equal to the owners when it loads. What counts as a status number is spelled out in
  `status_numbers` and `cython_status_numbers`. tests/ is exempt from the
  status rule only: tests check the numbers the wire carries, and the
  reference models state them from the spec on their own, so that a wrong
  number in the owner fails them (a test that read the owner would check the
  engine against itself).
- No Python write into a ledger table: money moves only in the kernel
  (`ledger_writes`).

Each rule also runs on small snippets here, so that it is known to find what
it should and nothing else.

Every rule is enforced over the whole tree (RULED_DIRS).
"""
import ast
import os
import re
import subprocess
from pathlib import Path

from engine.protocol.limits import BATCH_RECORDS_MAX
from engine.protocol.status import ErrorCode, Status

ROOT = Path(__file__).resolve().parent.parent
RULED_DIRS = ("engine", "ext", "bench", "loadtest", "tests", "tools")
PYTHON = (".py",)
CYTHON = (".pyx", ".pxi", ".pxd")
FUNCTION_LINES_MAX = 70
# The owners of the constants, and the one file of the kernel's compile-time
# copies (ext/**/consts.pxi, checked equal to the owners when the kernel loads).
LIMITS_OWNER = "engine/protocol/limits.py"
STATUS_OWNER = "engine/protocol/status.py"
KERNEL_CONSTANTS = "consts.pxi"


def tracked(suffixes: tuple, dirs: tuple = RULED_DIRS) -> list[str]:
    """The files under `dirs` that git tracks (in a tree without git: every
    file there, bar build output and hidden folders), ending in `suffixes`."""
    try:
        listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--", *dirs],
                                 check=True, capture_output=True, timeout=60).stdout
        paths = [p for p in listing.decode().split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        paths = [str(p.relative_to(ROOT)) for d in dirs if (ROOT / d).is_dir()
                 for p in (ROOT / d).rglob("*")
                 if not {"build", "__pycache__"} & set(p.parts)
                 and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    return sorted(p for p in paths if p.endswith(suffixes) and (ROOT / p).is_file())


def read(path: str) -> str:
    return (ROOT / path).read_text(encoding="utf-8")


# -- function length ------------------------------------------------------------

def python_functions(source: str) -> list[tuple[str, int, int]]:
    """(name, def line, last line of the body) of every function, nested ones too."""
    return [(node.name, node.lineno, node.end_lineno) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


CYTHON_DEF = re.compile(r"(?:async\s+def|def|cpdef|cdef)\s")
CYTHON_NOT_A_FUNCTION = re.compile(
    r"cdef\s+(?:(?:public|api|readonly)\s+)*(?:class|struct|union|enum|extern|packed|cppclass"
    r"|fused)\b|cpdef\s+enum\b")


def logical_lines(source: str) -> list[tuple[int, int, int, str]]:
    """(first line, last line, indent, code) of each logical line of Python or
    Cython source: lines joined inside brackets, strings and backslashes;
    comments dropped; every string literal reduced to ''. Blank lines and
    comment lines are not logical lines."""
    out, parts = [], []
    quote, depth, start, indent = None, 0, None, 0
    for number, line in enumerate(source.splitlines(), 1):
        if start is None:
            stripped = line.lstrip()
            if not stripped or stripped.startswith("#"):
                continue
            start, indent = number, len(line) - len(stripped)
        code, quote, depth = _scan(line, quote, depth)
        parts.append(code)
        if quote is None and depth == 0 and not code.endswith("\\"):
            out.append((start, number, indent, " ".join(p.strip() for p in parts).strip()))
            start, parts = None, []
    return out


def _scan(line: str, quote, depth: int):
    """The code of one physical line (strings as '', no comment), and the
    open string quote and bracket depth after it."""
    code, i = [], 0
    while i < len(line):
        if quote is not None:           # inside a string: find its end
            end = line.find(quote, i)
            while end > 0 and len(quote) == 1 and _escaped(line, end):
                end = line.find(quote, end + 1)
            if end < 0:
                if len(quote) == 1 and not line.endswith("\\"):
                    quote = None        # a one-line string left open ends with its line
                return "".join(code), quote, depth
            i, quote = end + len(quote), None
            code.append("''")
            continue
        char = line[i]
        if char == "#":
            break
        if char in "'\"":
            quote = line[i:i + 3] if line[i:i + 3] in ("'''", '"""') else char
            i += len(quote)
            continue
        depth += (char in "([{") - (char in ")]}")
        depth = max(depth, 0)
        code.append(char)
        i += 1
    return "".join(code), quote, depth


def _escaped(line: str, at: int) -> bool:
    backslashes = len(line[:at]) - len(line[:at].rstrip("\\"))
    return backslashes % 2 == 1


def cython_functions(source: str) -> list[tuple[str, int, int]]:
    """(name, def line, last line of the body) of every def, cdef and cpdef
    function (declarations without a body, as in a .pxd, are not functions)."""
    lines = logical_lines(source)
    found = []
    for k, (first, last, indent, code) in enumerate(lines):
        if not CYTHON_DEF.match(code) or CYTHON_NOT_A_FUNCTION.match(code):
            continue
        head, paren, rest = code.partition("(")
        if not paren or ":" not in rest.rpartition(")")[2]:
            continue                    # `cdef int x = f(y)`, `cdef int f(int x)` (no body)
        end = last
        for _first, body_last, body_indent, _code in lines[k + 1:]:
            if body_indent <= indent:
                break
            end = body_last
        found.append((head.split()[-1].lstrip("*&"), first, end))
    return found


def too_long(source: str, parse) -> list[tuple[str, int, int]]:
    """(name, def line, lines) of the functions over FUNCTION_LINES_MAX lines."""
    return [(name, first, last - first + 1) for name, first, last in parse(source)
            if last - first + 1 > FUNCTION_LINES_MAX]


def long_functions(paths: list[str], parse) -> list[str]:
    return [f"{path}:{first} {name} is {lines} lines"
            for path in paths for name, first, lines in too_long(read(path), parse)]


def test_tidy_rules_over_the_files_it_should():
    python, cython = tracked(PYTHON), tracked(CYTHON)
    assert {"engine/core/engine.py", "tests/conftest.py", "bench/bench_engine.py"} <= set(python)
    assert len(python) > 100 and any(p.startswith("ext/") and p.endswith(".pyx") for p in cython)
    assert sum(len(cython_functions(read(p))) for p in cython) > 100


def test_no_python_function_over_70_lines():
    offenders = long_functions(tracked(PYTHON), python_functions)
    assert not offenders, f"split these functions (at most {FUNCTION_LINES_MAX} lines): {offenders}"


def test_no_cython_function_over_70_lines():
    offenders = long_functions(tracked(CYTHON), cython_functions)
    assert not offenders, (f"split these functions into named `cdef inline` steps "
                           f"(at most {FUNCTION_LINES_MAX} lines): {offenders}")


def test_function_lengths_are_counted_from_def_to_the_last_body_line():
    body = "".join(f"    x{i} = {i}\n" for i in range(FUNCTION_LINES_MAX - 1))
    source = f"@decorator\ndef fits():\n{body}\n\ndef over():\n{body}    x = 1\n"
    assert [(n, b - a + 1) for n, a, b in python_functions(source)] == [
        ("fits", FUNCTION_LINES_MAX), ("over", FUNCTION_LINES_MAX + 1)]
    assert too_long(source, python_functions) == [("over", 74, FUNCTION_LINES_MAX + 1)]


CYTHON_SAMPLE = '''\
cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef int64_t LIMIT = max(1, 2)          # a variable, not a function
cdef int declared(int x) nogil          # a declaration (.pxd): no body

cdef inline int64_t fee(int64_t amount,
                        int64_t bps) noexcept nogil:
    """Fee, rounded down.
A docstring line at column 0 stays in the body.
    """
    # a comment
    return amount * bps // 10_000

cdef class Ledger:
    cdef public int64_t bank

    def __init__(self, int x=(1 +
  2)):
        self.bank = x   # "a # in a comment", '# in a string'
        s = "}{)( # not code"

    cpdef int pay(self) except -1:
        return 0
# a trailing comment

def last(): return 1
'''


def test_cython_functions_are_found_with_their_bodies():
    assert cython_functions(CYTHON_SAMPLE) == [
        ("fee", 7, 13), ("__init__", 18, 21), ("pay", 23, 24), ("last", 27, 27)]
    body = "".join(f"    x{i} = {i}\n" for i in range(FUNCTION_LINES_MAX))
    over = f"cdef int over(int a) nogil:\n{body}"
    assert too_long(over, cython_functions) == [("over", 1, FUNCTION_LINES_MAX + 1)]
    assert too_long(over.replace("    x0 = 0\n", ""), cython_functions) == []


# -- constants: one owner each ---------------------------------------------------

def literal_batch_maximum(source: str) -> list[int]:
    """Lines with the batch maximum as an integer literal (8_190 included)."""
    return sorted({node.lineno for node in ast.walk(ast.parse(source))
                   if isinstance(node, ast.Constant) and type(node.value) is int
                   and node.value == BATCH_RECORDS_MAX})


CYTHON_BATCH_MAXIMUM = re.compile(rf"\b(?:{BATCH_RECORDS_MAX}|{BATCH_RECORDS_MAX:_})\b")


def cython_literal_batch_maximum(source: str) -> list[int]:
    return [first for first, _last, _indent, code in logical_lines(source)
            if CYTHON_BATCH_MAXIMUM.search(code)]


STATUS_NAMES_UPPER = {name.upper() for name in (*Status.__members__, *ErrorCode.__members__)}


def _int(node) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int


def _ints(node) -> bool:
    """An int literal, or a tuple/list/set display of them (`status in (0, 8)`)."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(_int(e) for e in node.elts)
    return _int(node)


def _names_a_status(node) -> bool:
    """`status`, `x_status`, `x.status`, `x["status"]`."""
    if isinstance(node, ast.Name):
        name = node.id.lower()
    elif isinstance(node, ast.Attribute):
        name = node.attr.lower()
    elif isinstance(node, ast.Subscript):
        key = node.slice
        name = key.value.lower() if isinstance(key, ast.Constant) and isinstance(
            key.value, str) else ""
    else:
        return False
    return name == "status" or name.endswith("_status")


def _status_number(node) -> bool:
    if isinstance(node, ast.Call):              # Status(8), ErrorCode(7)
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(
            node.func, "id", "")
        return func in ("Status", "ErrorCode") and bool(node.args) and _int(node.args[0])
    if isinstance(node, ast.Compare):           # status == 8, r["status"] != 0
        operands = [node.left, *node.comparators]
        return any(map(_names_a_status, operands)) and any(map(_ints, operands))
    if isinstance(node, ast.Dict):              # {"status": 0}
        return any(isinstance(k, ast.Constant) and k.value == "status" and _int(v)
                   for k, v in zip(node.keys, node.values))
    if isinstance(node, ast.keyword):           # f(status=8)
        return node.arg is not None and _names_a_status(ast.Name(node.arg)) and _int(node.value)
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None:
        # status = 8, out["status"] = 8, PROGRAM_NOT_FOUND = 30 (a Status member's name)
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return _int(node.value) and any(
            _names_a_status(t) or isinstance(t, ast.Name) and t.id in STATUS_NAMES_UPPER
            for t in targets)
    return False


def status_numbers(source: str) -> list[int]:
    """Lines where Python code spells a status (or error code) as a number:
    `Status(<int>)`/`ErrorCode(<int>)`; a comparison of a status (`status`,
    `*_status`, `x.status`, `x["status"]`) with an int literal or a display of
    them; `"status": <int>` in a dict display; `status=<int>` as a keyword;
    an int literal assigned to a status, or to a name that is a status's name
    in capitals (`INSUFFICIENT_FUNDS = 8`)."""
    return sorted({node.lineno for node in ast.walk(ast.parse(source)) if _status_number(node)})


CYTHON_STATUS_NUMBER = re.compile(
    r"\bST_[A-Z0-9_]+\s*=\s*\d"                             # the kernel's status enum
    r"|\b(?:\w+_)?status\s*(?:==|!=|=)\s*\d", re.IGNORECASE)  # status = 8, status == 0


def cython_status_numbers(source: str) -> list[int]:
    """Lines where Cython code defines a status constant (`ST_* = <int>`)
    or compares or sets a status with a number."""
    return [first for first, _last, _indent, code in logical_lines(source)
            if CYTHON_STATUS_NUMBER.search(code)]


def offenders(paths: list[str], find, owners: tuple) -> list[str]:
    return [f"{path}:{line}" for path in paths
            if path not in owners and not path.endswith("/" + KERNEL_CONSTANTS)
            for line in find(read(path))]


def test_the_constant_rules_find_literals_and_nothing_else():
    flagged = f'''\
a = {BATCH_RECORDS_MAX}
b = f(1, {BATCH_RECORDS_MAX:_})
if Status(8): pass
if r["status"] == 0: pass
if 0 != out.status: pass
if item_status in (0, 8): pass
reply = {{"id": 1, "status": 0}}
make(status=8)
x["status"] = 29
INSUFFICIENT_FUNDS = 8
BUSY: int = 7
'''
    assert literal_batch_maximum(flagged) == [1, 2]
    assert status_numbers(flagged) == list(range(3, 12))
    fine = '''\
STATUS_SLOTS = 64
count = 8189 + 2
if r["status"] == Status.ok: pass
reply = {"status": STATUS_OK, "code": 3}
status = compute(0)
if status: pass
make(slots=8)
text = "status == 8"
'''
    assert literal_batch_maximum(fine) == [] and status_numbers(fine) == []
    cython = f'''\
cdef enum:
    ST_OK = 0
    ST_INSUFFICIENT_FUNDS = 8
    HIST_US_MAX = 2_000_000
cdef int64_t BATCH = {BATCH_RECORDS_MAX:_}   # {BATCH_RECORDS_MAX} in a comment is fine
if st != ST_OK and status == 0:
    out.status = 3
s = "status = 8 and {BATCH_RECORDS_MAX}"
'''
    assert cython_status_numbers(cython) == [2, 3, 6, 7]
    assert cython_literal_batch_maximum(cython) == [5]


def test_no_literal_batch_maximum_in_python_outside_its_owner():
    found = offenders(tracked(PYTHON), literal_batch_maximum, (LIMITS_OWNER,))
    assert not found, f"use engine.protocol.limits.BATCH_RECORDS_MAX: {found}"


def test_no_status_number_in_python_outside_its_owner():
    """tests/ is exempt: its models state the numbers from the spec on their own."""
    found = offenders([p for p in tracked(PYTHON) if not p.startswith("tests/")],
                      status_numbers, (STATUS_OWNER,))
    assert not found, f"use engine.protocol.status (Status.<name>, STATUS_OK): {found}"


# -- the Cython kernel and extensions (ext/**/*.pyx, *.pxi, *.pxd) ---------------


def test_no_literal_batch_maximum_in_cython_outside_its_owner():
    found = offenders(tracked(CYTHON), cython_literal_batch_maximum, ())
    assert not found, f"the kernel's copy goes in {KERNEL_CONSTANTS}: {found}"


def test_no_status_number_in_cython_outside_its_owner():
    found = offenders(tracked(CYTHON), cython_status_numbers, ())
    assert not found, f"the kernel's copies go in {KERNEL_CONSTANTS}: {found}"


# -- money moves only in the kernel ----------------------------------------------

LEDGER = "ledger"
# Methods that write into the array they are called on, and numpy functions
# that write into their first argument.
ARRAY_WRITERS = frozenset({"fill", "put", "itemset", "sort", "partition", "resize", "setfield"})
NUMPY_WRITERS = frozenset({"copyto", "put", "place", "putmask", "put_along_axis", "at"})
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def _under_the_ledger(node, aliases: frozenset) -> bool:
    """Whether `node` (x.a[b].c ...) is something inside a ledger: below an
    attribute `.ledger`, below a name `ledger`, or below an alias of one."""
    if not isinstance(node, (ast.Attribute, ast.Subscript)):
        return False
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
        if isinstance(node, ast.Attribute) and node.attr == LEDGER:
            return True
    return isinstance(node, ast.Name) and (node.id == LEDGER or node.id in aliases)


def _is_the_ledger_or_in_it(node, aliases: frozenset) -> bool:
    if isinstance(node, ast.Name):
        return node.id == LEDGER or node.id in aliases
    if isinstance(node, ast.Attribute) and node.attr == LEDGER:
        return True
    return _under_the_ledger(node, aliases)


def _own_nodes(scope):
    """The nodes of a scope, without the bodies of the scopes inside it."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, SCOPES):
            todo.extend(ast.iter_child_nodes(node))


def _aliases(nodes: list, inherited: frozenset) -> frozenset:
    """Names bound (=, :=, for) to the ledger, a table of it, or a row or
    column of one (not to a call's result: `int(ledger.bank)` is a copy).
    Flow-insensitive: a name that is ever an alias is one everywhere."""
    aliases = set(inherited)
    for _ in range(len(nodes) + 1):         # until nothing new (each pass adds one or stops)
        before = len(aliases)
        for node in nodes:
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.NamedExpr)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                value = node.value
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
                targets, value = [node.target], node.iter
            else:
                continue
            if value is None or not _is_the_ledger_or_in_it(value, frozenset(aliases)):
                continue
            for target in targets:
                names = target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]
                aliases.update(n.id for n in names if isinstance(n, ast.Name))
        if len(aliases) == before:
            return frozenset(aliases)
    raise AssertionError("aliases did not settle")


def _writes(node, aliases: frozenset) -> bool:
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
        return any(_under_the_ledger(t, aliases)
                   for target in targets
                   for t in (target.elts if isinstance(target, (ast.Tuple, ast.List))
                             else [target]))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        method = node.func.attr
        if method in ARRAY_WRITERS and _under_the_ledger(node.func.value, aliases):
            return True             # ledger.users["balance"].fill(0)
        return (method in NUMPY_WRITERS and bool(node.args)
                and _is_the_ledger_or_in_it(node.args[0], aliases))     # np.copyto(ledger.x, ...)
    return False


def ledger_writes(source: str) -> list[int]:
    """Lines where Python writes into a ledger: an assignment, augmented
    assignment or del whose target is an attribute or item of the ledger (a
    name `ledger`, an attribute `.ledger`: `ledger.bank -= 1`,
    `state.ledger.users["balance"][slot] = 0`), or of a name bound to one of
    its tables, rows or columns (`rows = ledger.stocks; rows["x"][s] = 1`);
    or an in-place numpy write into one (`.fill`, `np.copyto`, `np.add.at`...).
    Binding the ledger itself (`self.ledger = Ledger()`) is not a write."""
    found = set()

    def visit(scope, inherited: frozenset) -> None:
        nodes = list(_own_nodes(scope))
        aliases = _aliases(nodes, inherited)
        found.update(node.lineno for node in nodes if _writes(node, aliases))
        for node in nodes:
            if isinstance(node, SCOPES):
                visit(node, aliases)

    visit(ast.parse(source), frozenset())
    return sorted(found)


def test_no_python_write_into_a_ledger_table():
    """Money moves only in the kernel: Python validates a request and calls a
    kernel function that posts it."""
    found = [f"{path}:{line}" for path in tracked(PYTHON, ("engine",))
             for line in ledger_writes(read(path))]
    assert not found, f"move these writes into a kernel function: {found}"


def test_the_ledger_rule_finds_writes_and_nothing_else():
    flagged = '''\
def topup(state, slot, amount):
    ledger = state.ledger
    ledger.users["balance"][slot] += amount
    ledger.bank -= amount
    state.ledger.codes["user"][slot] = 1
    rows = ledger.merchants
    rows["fee_bps"][slot] = 5
    row = rows[slot]
    row["active"] = 0
    ledger.users["balance"].fill(0)
    np.copyto(state.ledger.users["held"], 0)
    np.add.at(rows["balance"], [slot], 1)
    for stock in ledger.stocks:
        stock["spent"] = 0
    del ledger.bank

    def inner():
        rows["tags"][0] = 1
'''
    assert ledger_writes(flagged) == [3, 4, 5, 7, 9, 10, 11, 12, 14, 15, 18]
    fine = '''\
class State:
    def __init__(self):
        self.ledger = Ledger(0, 0)

def read(state, slot, rows):
    ledger = state.ledger
    balance = int(ledger.users["balance"][slot])
    out = {}
    out["balance"] = balance
    copy = ledger.users["balance"].copy()
    slot = ledger.append("users", 5)
    ledger.reserve("payments", 10)
    rows["x"] = 1
    items = [1, 2]
    items[0] = 2

def other():
    rows = []
    rows[0] = 1
'''
    assert ledger_writes(fine) == []
