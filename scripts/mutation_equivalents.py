"""Which of mutmut's mutants are equivalent by a rule the tool checks itself: the only change is
the letter case of SQL text that DuckDB reads without regard to case.

mutmut mutates every string literal three ways: wrapped in "XX", lower-cased and upper-cased. In
a module that writes its SQL as Python strings (`dashboards/queries.py`), most lower-cased and
many upper-cased pieces of SQL mean the same query: DuckDB reads keywords, function names and
unquoted identifiers in any case. Such a mutant cannot be killed by any behaviour, and leaving it
in the run buries the real survivors. Not every case change is harmless, though, and the rule
keeps those as ordinary mutants:

- text inside a SQL string literal (`'positions'`, `'$.sweep'`) or a quoted identifier (`"tokens"`)
  is compared as written;
- an alias (the word after AS, outside a CAST's type) names a result column, and DuckDB keeps
  its case (`count(*) AS N` gives a column "N");
- an identifier where it may name a result column: in a select list, or where the piece of SQL
  starts without saying which clause it is in (an unaliased `X + 1` is a column "(X + 1)"),
  unless the piece shows it is a whole select item that is a bare column (`SELECT F.X, ...`, which
  DuckDB names after the column read, `x`);
- a `{placeholder}` of Python's str.format.

A change to a keyword (from the fixed list below), a function name (a word before "("), a CTE or
window name (a word before "AS ("), a CAST's type (a type name after AS inside CAST( or right
before the ")" that closes it, when the piece starts after the "CAST("), or an identifier inside FROM, JOIN, WHERE,
GROUP BY, ORDER BY, HAVING, ON, USING, PARTITION BY, WINDOW, LIMIT is equivalent. A literal is
SQL when it has at least one whole-word upper-case keyword of SQL_MARKERS (the house style writes
SQL keywords upper-case; Python strings in the module do not).

A mutant is equivalent when its function differs from the original in exactly one string
constant and that pair passes the rule; `scripts/mutation.py` then leaves it out of the run and
`benchmarks/mutation_scores.py` reports it apart ("equivalent: N"), never as killed.
`scripts/mutation.sh MODULE --check-equivalents` runs them too: a killed one means the rule (or a
test that reads SQL text) is wrong.

This module is not the mutation runner (`scripts/mutation.py`) nor the score report.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

KEYWORDS = frozenset("""
    ALL AND ANY AS ASC BETWEEN BY CASE CAST DESC DISTINCT ELSE END EXISTS FALSE FILTER FOLLOWING FROM
    FULL GROUP HAVING HOUR IN INNER INTERVAL IS JOIN LEFT LIKE LIMIT MICROSECOND MINUTE NAME NOT NULL
    NULLS OFFSET ON OR ORDER OUTER OVER PARTITION PRECEDING RANGE RIGHT ROWS SECOND SELECT THEN TRUE
    TRY_CAST UNBOUNDED UNION USING WHEN WHERE WINDOW WITH CURRENT ROW FIRST LAST
""".split())
TYPES = frozenset("BIGINT BOOLEAN DOUBLE FLOAT HUGEINT INTEGER SMALLINT TIMESTAMP UBIGINT VARCHAR".split())
# keywords after which, up to the next of these, identifiers cannot name a result column
NON_OUTPUT_CLAUSES = frozenset("FROM JOIN WHERE GROUP ORDER HAVING ON USING PARTITION WINDOW LIMIT OFFSET".split())
TOKEN = re.compile(r"""'(?:[^']|'')*'?|"(?:[^"]|"")*"?|\{[^{}]*\}?|[A-Za-z_][A-Za-z0-9_]*|\s+|.""", re.S)


# the keywords that make a literal SQL (words such as NAME or FIRST could be Python text too)
SQL_MARKERS = frozenset("""
    AND AS BETWEEN BY CASE CAST DESC DISTINCT EXISTS FROM GROUP HAVING INTERVAL IS JOIN LIMIT NOT NULL
    ORDER OVER PARTITION SELECT THEN TRY_CAST UNION USING WHEN WHERE WINDOW WITH
""".split())


def is_sql(text: str) -> bool:
    return any(word in SQL_MARKERS for word in re.findall(r"\b[A-Z_]+\b", text))


def sql_case_reason(original: str, mutated: str) -> str | None:
    """Why `mutated` is the same SQL as `original` (a sentence), or None when it may not be."""
    if original == mutated or len(original) != len(mutated) or original.lower() != mutated.lower():
        return None
    if not is_sql(original):
        return None
    tokens = [(m.start(), m.group()) for m in TOKEN.finditer(original)]
    words = [(i, t) for i, (_, t) in enumerate(tokens) if not t.isspace()]
    # per open parenthesis: (the word that opened it, whether identifiers there may name a column)
    stack: list[tuple[str, bool]] = [("", True)]  # a piece starting mid-statement: assume a select list
    changed = []
    for n, (i, text) in enumerate(words):
        start = tokens[i][0]
        before = words[n - 1][1] if n else ""
        after = words[n + 1][1] if n + 1 < len(words) else ""
        after2 = words[n + 2][1] if n + 2 < len(words) else ""
        upper = text.upper()
        if text == "(":
            stack.append((before.upper(), stack[-1][1]))
        elif text == ")":
            stack.pop() if len(stack) > 1 else stack.__setitem__(0, ("", True))
        elif upper == "SELECT":
            stack[-1] = (stack[-1][0], True)
        elif upper in NON_OUTPUT_CLAUSES:
            stack[-1] = (stack[-1][0], False)
        if mutated[start:start + len(text)] == text:
            continue
        if text[0] in "'\"{":
            return None  # a SQL string, a quoted identifier or a format placeholder
        if upper in TYPES and before.upper() == "AS" and (stack[-1][0] in ("CAST", "TRY_CAST") or after == ")"):
            changed.append(f"type {text}")
        elif before.upper() == "AS":
            return None  # an alias: the result column's name keeps its case
        elif upper in KEYWORDS:
            changed.append(f"keyword {text}")
        elif after == "(":
            changed.append(f"function {text}")
        elif after.upper() == "AS" and after2 == "(":
            changed.append(f"CTE/window {text}")
        elif not stack[-1][1]:
            changed.append(f"identifier {text}")
        elif _whole_column_item(words, n):
            changed.append(f"column {text}")
        else:
            return None  # an identifier that may name a result column
    return "SQL letter case only: " + ", ".join(changed) if changed else None


def _whole_column_item(words: list[tuple[int, str]], n: int) -> bool:
    """Whether word n is part of a select item that is a bare column reference (`x`, `f.x`, `f.*`),
    from SELECT, DISTINCT or a comma to a comma, FROM or AS, all inside the piece: DuckDB names
    such a result column after the column it reads, not as the query spells it."""
    def is_name(i):
        return 0 <= i < len(words) and (words[i][1] == "*" or words[i][1][0].isalpha() or words[i][1][0] == "_")
    start = n
    while start - 2 >= 0 and words[start - 1][1] == "." and is_name(start - 2):
        start -= 2
    end = n
    while end + 2 < len(words) and words[end + 1][1] == "." and is_name(end + 2):
        end += 2
    before = words[start - 1][1].upper() if start >= 1 else None
    after = words[end + 1][1].upper() if end + 1 < len(words) else None
    return before in ("SELECT", "DISTINCT", ",") and after in (",", "FROM", "AS")


def _string_differences(a: ast.AST, b: ast.AST) -> list[tuple[str, str]] | None:
    """The (original, mutated) string constants where two trees differ; None when they differ in
    anything else."""
    if type(a) is not type(b):
        return None
    if isinstance(a, ast.Constant):
        if a.value == b.value and type(a.value) is type(b.value):
            return []
        if isinstance(a.value, str) and isinstance(b.value, str):
            return [(a.value, b.value)]
        return None
    out = []
    for field in a._fields:
        x, y = getattr(a, field, None), getattr(b, field, None)
        if isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                return None
            pairs = zip(x, y)
        else:
            pairs = [(x, y)]
        for u, v in pairs:
            if isinstance(u, ast.AST):
                d = _string_differences(u, v)
                if d is None:
                    return None
                out += d
            elif u != v and not (field == "name" and isinstance(a, (ast.FunctionDef, ast.AsyncFunctionDef))):
                return None
    return out


def equivalents(mutated_code: str, mutant_names: list[str], prefix: str) -> dict[str, str]:
    """Mutant name → reason, for the mutants of a mutmut-mutated file (its trampolined code, with
    `x_f__mutmut_orig` and `x_f__mutmut_N` functions) that pass `sql_case_reason`."""
    functions = {node.name: node for node in ast.walk(ast.parse(mutated_code))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in node.name}
    out = {}
    for name in mutant_names:
        func = name.rpartition(".")[2]
        original = functions.get(func.rpartition("__mutmut_")[0] + "__mutmut_orig")
        mutant = functions.get(func)
        if original is None or mutant is None:
            continue
        diff = _string_differences(original, mutant)
        if diff and len(diff) == 1:
            reason = sql_case_reason(*diff[0])
            if reason:
                out[f"{prefix}.{func}"] = reason
    return out
