"""A Python source as the selection sees it: its blocks with their digests, which block a line is in,
and the repository files it imports.

A block is a function (a method: ``Class.method``) defined at the top of the module or of a class
at its top; a nested function belongs to the block around it. What is left — imports, constants,
class bodies, decorators and signatures — is the module block, ``<module>``, run at import. A
function whose result is cached (``functools.cache``, ``lru_cache``, ``cached_property``) belongs to
the module block too: only its first caller runs its body, every later one uses what it made. Digests
are of the AST without docstrings: a change to a comment, a docstring or the layout changes no
digest; a change to a function's body changes its own, and a change at module level (a constant,
a new function, a signature) the module's.
"""

from __future__ import annotations

import ast
import functools
import gc
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

MODULE = "<module>"
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def parse(text: str, filename: str = "<unknown>") -> ast.Module:
    """``ast.parse`` with the garbage collector held off: on CPython 3.11 a finalizer that parses too
    (pytest formatting an exception a ``__del__`` raised) corrupts the AST builder's recursion count,
    and the outer parse fails with "AST constructor recursion depth mismatch"."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(text, filename)
    finally:
        if enabled:
            gc.enable()


def _digest(node: ast.AST) -> str:
    return hashlib.blake2b(ast.dump(node).encode(), digest_size=8).hexdigest()


def _without_docstring(body: list[ast.stmt]) -> list[ast.stmt]:
    first = body[0] if body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return body[1:]
    return body


CACHING = {"cache", "lru_cache", "cached_property"}


def _cached(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
        if name in CACHING:
            return True
    return False


def _top_functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(name, node) of each top-level function and each method of a top-level class, but cached ones."""
    found = []
    for node in tree.body:
        if isinstance(node, _FUNCTIONS):
            found.append((node.name, node))
        elif isinstance(node, ast.ClassDef):
            found += [(f"{node.name}.{item.name}", item) for item in node.body if isinstance(item, _FUNCTIONS)]
    return [(name, node) for name, node in found if not _cached(node)]


class _Skeleton(ast.NodeTransformer):
    """The module block: every top function's body replaced by ``...``, docstrings dropped."""

    def __init__(self, functions: set[int]):
        self.functions = functions

    def visit_FunctionDef(self, node):
        if id(node) in self.functions:
            node.body = [ast.Expr(ast.Constant(...))]
            return node
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        node.body = _without_docstring(node.body) or [ast.Pass()]
        return self.generic_visit(node)


@dataclass(frozen=True)
class Source:
    """One parsed Python file."""

    #: Block name -> digest, ``<module>`` included.
    blocks: dict[str, str]
    #: (first line, last line, block name) of each function block, in order.
    spans: tuple[tuple[int, int, str], ...]
    #: Absolute module names it imports anywhere (in functions too), relative ones resolved.
    imports: tuple[str, ...]

    @classmethod
    def parse(cls, text: str, package: str = "") -> Source:
        tree = parse(text)
        functions = _top_functions(tree)
        spans = tuple((node.body[0].lineno, node.end_lineno, name) for name, node in functions)
        blocks = {}
        for name, node in functions:
            node.body = _without_docstring(node.body) or [ast.Pass()]
            blocks[name] = _digest(node)
        imports = _imports(tree, package)
        skeleton = _Skeleton({id(node) for _, node in functions}).visit(tree)
        skeleton.body = _without_docstring(skeleton.body)
        blocks[MODULE] = _digest(skeleton)
        return cls(blocks, spans, imports)

    @classmethod
    def read(cls, path: Path, root: Path) -> Source | None:
        """``path`` parsed (its package from its place under ``root``), or None if it is not Python any more."""
        try:
            return cls.parse(path.read_text(encoding="utf-8"), package_of(path, root))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            return None

    def block_at(self, line: int) -> str:
        """The block that line ``line`` belongs to."""
        for first, last, name in self.spans:
            if first <= line <= last:
                return name
        return MODULE


def _imports(tree: ast.Module, package: str) -> tuple[str, ...]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                anchor = ".".join(parts[: len(parts) - node.level + 1]) if node.level <= len(parts) + 1 else ""
                base = ".".join(filter(None, (anchor, base)))
            found += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return tuple(dict.fromkeys(name for name in found if name))


def package_of(path: Path, root: Path) -> str:
    """The package a file is in, as far as its directories with an ``__init__.py`` go (for relative imports)."""
    parts = []
    directory = path.parent
    while directory != root and (directory / "__init__.py").exists():
        parts.append(directory.name)
        directory = directory.parent
    return ".".join(reversed(parts))


@functools.cache
def _module_file(name: str, search: tuple[Path, ...]) -> Path | None:
    relative = Path(*name.split("."))
    for directory in search:
        for candidate in (directory / relative.with_suffix(".py"), directory / relative / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def module_file(name: str, search: list[Path]) -> Path | None:
    """The repository file that would be imported as ``name`` from ``search`` (``sys.path``'s entries under the repository)."""
    return _module_file(name, tuple(search))


def import_closure(start: Path, search: list[Path], parse) -> list[Path]:
    """Every repository file that ``start`` imports, directly or through others (``parse(path)`` -> Source or None).

    A name that is not a repository module is left alone (an installed package: the environment's
    fingerprint covers it); ``from package import name`` counts ``package`` and, if it is a module, ``package.name``.
    """
    seen, todo = {start}, [start]
    while todo:
        source = parse(todo.pop())
        if source is None:
            continue
        for name in source.imports:
            if name.partition(".")[0] in sys.stdlib_module_names:
                continue
            parts = name.split(".")
            for end in range(1, len(parts) + 1):  # a submodule's import runs its packages' __init__ too
                found = module_file(".".join(parts[:end]), search)
                if found is not None and found not in seen:
                    seen.add(found)
                    todo.append(found)
    seen.discard(start)
    return sorted(seen)
