"""The query-layer rule: SQL lives only in chips_core/workspace/store.py and chips_core/workspace/catalog*.

Every other module of chips_core/ and app/ reads and writes the workspace through catalog functions, so the
same query is written once. The scan finds DuckDB query calls (`.execute(`, `.executemany(`, `.sql(`,
`.query(`) and string literals that look like SQL statements.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = ("chips_core/workspace/store.py", "chips_core/workspace/catalog")
QUERY_CALLS = {"execute", "executemany", "sql", "query"}
SQL_TEXT = re.compile(
    r"\bSELECT\b[\s\S]*\bFROM\b|\bINSERT\s+(OR\s+\w+\s+)?INTO\b|\bUPDATE\s+\w+\s+SET\b|\bDELETE\s+FROM\b"
    r"|\bCOPY\s*\(|\bnextval\(",
)
# user-facing hints that quote a query for people to run themselves (never executed)
HINTS = ("SELECT * FROM rejects WHERE pool_id = ",)


def _sources() -> list[Path]:
    files = [*sorted((ROOT / "chips_core").rglob("*.py")), *sorted((ROOT / "app").rglob("*.py"))]
    return [f for f in files if not f.relative_to(ROOT).as_posix().startswith(ALLOWED)]


def _strings(node: ast.AST) -> list[tuple[int, str]]:
    """Every string literal (an f-string's literal parts joined) with its line."""
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.JoinedStr):
            out.append((n.lineno, "".join(v.value for v in n.values if isinstance(v, ast.Constant))))
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            out.append((n.lineno, n.value))
    return out


def violations() -> list[str]:
    """'path:line: what' for each SQL call or SQL text outside the query layer."""
    found = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        for n in ast.walk(tree):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in QUERY_CALLS:
                found.append(f"{rel}:{n.lineno}: .{n.func.attr}(...) call")
        for line, text in _strings(tree):
            if SQL_TEXT.search(text) and not any(h in text for h in HINTS):
                found.append(f"{rel}:{line}: SQL text {text[:60]!r}")
    return found


def test_sql_lives_only_in_store_and_catalog() -> None:
    bad = violations()
    assert not bad, "SQL outside workspace/store.py and workspace/catalog:\n" + "\n".join(bad)


def test_the_scan_sees_sql() -> None:
    """The scan itself finds a query call and SQL text (so an empty result means something)."""
    tree = ast.parse('con.execute("SELECT pool_id FROM pools WHERE name = ?", [n])\nx = "DELETE FROM t"')
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and n.func.attr in QUERY_CALLS]
    assert len(calls) == 1
    assert sum(bool(SQL_TEXT.search(t)) for _, t in _strings(tree)) == 2
