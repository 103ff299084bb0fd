"""The import rules of the layout (docs/ARCHITECTURE.md, "Layers and import rules"), read
from the source: only proxy/pkcs11/ imports python-pkcs11, only proxy/tls/ touches OpenSSL
(pyOpenSSL or our own cffi binding of libssl), only proxy/net/ touches sockets, only
proxy/http/ speaks HTTP/1.1 with h11, and only proxy/http2/ speaks HTTP/2 with h2. Imports
under ``if TYPE_CHECKING:`` are types, not uses, and are allowed anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent.parent / "proxy"

# module name prefix -> the package (under proxy/) that alone may import it
OWNERS = {
    "pkcs11": "pkcs11",
    "ctypes": "pkcs11",
    "OpenSSL": "tls",
    "cffi": "tls",
    "socket": "net",
    "select": "net",
    "trio.socket": "net",
    "h11": "http",
    "h2": "http2",
    "hpack": "http2",
    "hyperframe": "http2",
}
# One module outside its owner's package that may import it, and why.
ALLOWED = {
    ("ctypes", "ops/allocator.py"): "glibc's mallopt, once at start: nothing of a token",
}
# trio calls that are socket operations, allowed only in proxy/net/
SOCKET_CALLS = {
    "open_tcp_stream",
    "open_tcp_listeners",
    "serve_listeners",
    "wait_readable",
    "wait_writable",
    "SocketListener",
    "SocketStream",
}


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _package(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else ""


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _owner(module: str) -> str | None:
    for prefix, owner in OWNERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return owner
    return None


def violations(path: Path, package: str | None = None) -> list[str]:
    """What ``path`` does against the rules; ``package`` places a file outside proxy/."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = _type_checking_lines(tree)
    where = path.name if package is not None else str(path.relative_to(PACKAGE.parent))
    inside = str(path.relative_to(PACKAGE)) if package is None else None
    package = _package(path) if package is None else package
    found = []
    for line, module in _imports(tree):
        owner = _owner(module)
        if (module.split(".")[0], inside) in ALLOWED:
            continue
        if owner is not None and owner != package and line not in typing_only:
            found.append(f"{where}:{line} imports {module} (only proxy/{owner}/ may)")
    if package != "net":
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in SOCKET_CALLS
                and node.lineno not in typing_only
            ):
                found.append(f"{where}:{node.lineno} uses trio's {node.attr} (only proxy/net/ may)")
    return found


@pytest.mark.parametrize("path", _sources(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_module_keeps_the_import_rules(path: Path) -> None:
    assert violations(path) == []


def test_every_module_says_what_it_is_for() -> None:
    missing = [
        str(path.relative_to(PACKAGE))
        for path in _sources()
        if path.name != "__main__.py" and not ast.get_docstring(ast.parse(path.read_text()))
    ]
    assert missing == []


def test_the_rules_catch_a_violation(tmp_path: Path) -> None:
    """The checker itself: a module outside proxy/tls/ that imports OpenSSL, one outside
    proxy/net/ that awaits a socket, and a typing-only import that is fine."""
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text(
        '"""probe"""\nfrom typing import TYPE_CHECKING\nimport trio\nfrom OpenSSL import SSL\n'
        "if TYPE_CHECKING:\n    import pkcs11\n"
        "async def f(sock):\n    await trio.lowlevel.wait_readable(sock)\n"
    )
    found = violations(sneaky, package="http")
    assert any("imports OpenSSL" in entry for entry in found)
    assert any("wait_readable" in entry for entry in found)
    assert not any("pkcs11" in entry for entry in found)
