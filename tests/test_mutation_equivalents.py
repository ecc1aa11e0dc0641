"""The rule that marks mutmut's SQL letter-case mutants equivalent (scripts/mutation_equivalents.py):
every mutant it calls equivalent runs the same in DuckDB, with the same result and the same column
names, and the case changes that do show (an alias, a SQL string, a column an unaliased
expression names) are never called equivalent."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import duckdb
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from mutation_equivalents import equivalents, is_sql, sql_case_reason  # noqa: E402


def test_lower_cased_keywords_are_equivalent_and_named():
    piece = "SELECT count(*) AS n FROM sel WHERE kind IS NOT NULL"
    reason = sql_case_reason(piece, piece.lower())
    assert reason == ("SQL letter case only: keyword SELECT, keyword AS, keyword FROM, keyword WHERE, "
                      "keyword IS, keyword NOT, keyword NULL")


@pytest.mark.parametrize("piece, why", [
    ("SELECT count(*) AS n FROM sel", "alias n"),
    ("SELECT * FROM sel WHERE f.detail = 'positions'", "a SQL string"),
    ("SELECT json_extract_string(attributes, '$.sweep') AS s FROM sel", "a JSON path"),
    ('SELECT "tokens" FROM sel', "a quoted identifier"),
    ("SELECT x + 1 FROM sel", "an unaliased expression names its column after x"),
    ("SELECT f.x", "the item may go on in the next piece"),
    (", f.x + 1 FROM sel", "not a bare column"),
    (" min(start_time) AS first, max(start_time)", "a piece starting in a select list"),
    ("NOT contains({c}, ?)", "a str.format placeholder"),
    ("TRY_CAST(x AS INTEGER) AS loops", "the alias after the CAST"),
])
def test_case_changes_that_show_are_not_equivalent(piece, why):
    assert sql_case_reason(piece, piece.upper()) is None, why


@pytest.mark.parametrize("piece, mutated", [
    (" FROM sel GROUP BY grp ORDER BY flops DESC", " FROM SEL GROUP BY GRP ORDER BY FLOPS DESC"),
    (" FROM steps s JOIN groups g USING (grp) ORDER BY s.grp", " FROM STEPS S JOIN GROUPS G USING (GRP) ORDER BY S.GRP"),
    (" WHERE p.id BETWEEN ? AND ? GROUP BY ALL ORDER BY pick.grp", " WHERE P.ID BETWEEN ? AND ? GROUP BY ALL ORDER BY PICK.GRP"),
    ("CAST(x AS VARCHAR)", "cast(x as varchar)"),
    (" AS DOUBLE)", " as double)"),
    (" OVER (PARTITION BY f.grp ORDER BY i.iteration)", " OVER (PARTITION BY F.GRP ORDER BY I.ITERATION)"),
    (", g AS (SELECT 1)", ", G AS (SELECT 1)"),
    ("SELECT sum(x) AS s", "SELECT SUM(x) AS s"),
    ("SELECT trace_id FROM sel ORDER BY start_time", "SELECT TRACE_ID FROM SEL ORDER BY START_TIME"),
    ("SELECT f.grp, sw.*, rho_A FROM sel", "SELECT F.GRP, SW.*, RHO_a FROM SEL"),
])
def test_case_changes_that_cannot_show_are_equivalent(piece, mutated):
    assert sql_case_reason(piece, mutated) is not None


def test_only_sql_text_and_only_letter_case():
    assert not is_sql("attr:") and not is_sql("none") and not is_sql("filterType")
    assert sql_case_reason("attr:", "ATTR:") is None  # a Python string, compared by the code
    assert sql_case_reason("SELECT 1", "XXSELECT 1XX") is None  # more than the case
    assert sql_case_reason("SELECT 1", "SELECT 1") is None  # no change at all
    assert is_sql("x FROM t") and not is_sql("x from t")  # the house style: SQL keywords upper-case


FIXTURE = """
CREATE TABLE forwards AS SELECT * FROM (VALUES
  (1, 'r1', 'served', 2.0, 10, '{"sweep": "a"}'), (2, 'r1', 'shadow', 5.0, 30, '{"sweep": "b"}'),
  (3, 'r2', 'served', 7.0, 20, '{}'), (4, 'r2', 'served', 1.0, 20, '{"sweep": "A"}'))
  t(forward_id, run_id, kind, duration_ms, tokens, attributes);
"""
# Statements cut into pieces as dashboards/queries.py cuts its strings; each piece is mutated alone.
STATEMENTS = [
    ["WITH sel AS (SELECT f.*, f.run_id AS grp FROM forwards f WHERE f.kind = 'served')",
     " SELECT grp, count(*) AS forwards, sum(tokens) AS tokens, avg(duration_ms) AS mean_ms",
     " FROM sel GROUP BY grp ORDER BY grp"],
    ["SELECT run_id, json_extract_string(attributes, '$.sweep') AS sweep, CAST(tokens AS DOUBLE) AS t",
     " FROM forwards WHERE json_extract_string(attributes, '$.sweep') IS NOT NULL ORDER BY forward_id"],
    ["WITH per AS (SELECT run_id, sum(tokens) AS n FROM forwards GROUP BY run_id)",
     " SELECT per.run_id, n + 1, sum(n) OVER w AS running, per.n FROM per",
     " WINDOW w AS (ORDER BY per.run_id ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) ORDER BY per.run_id"],
    ["SELECT run_id, avg(duration_ms)", " AS mean_ms", " FROM forwards GROUP BY run_id ORDER BY run_id"],
]


def _run(con, sql: str) -> pd.DataFrame | str:
    try:
        return con.execute(sql).df()
    except duckdb.Error as e:
        return f"error: {type(e).__name__}"


@pytest.mark.parametrize("pieces", STATEMENTS)
def test_the_rule_agrees_with_duckdb(pieces):
    """Each piece lower- and upper-cased, as mutmut does: where the rule says equivalent, DuckDB gives
    the same frame with the same column names; at least one change per statement that the rule
    refuses does show in DuckDB (the rule is not merely refusing everything)."""
    con = duckdb.connect()
    con.execute(FIXTURE)
    expected = _run(con, "".join(pieces))
    assert isinstance(expected, pd.DataFrame) and len(expected)
    equivalent = refused_and_different = 0
    for i, piece in enumerate(pieces):
        for mutated in {piece.lower(), piece.upper()} - {piece}:
            got = _run(con, "".join([*pieces[:i], mutated, *pieces[i + 1:]]))
            same = isinstance(got, pd.DataFrame) and list(got.columns) == list(expected.columns) and got.equals(expected)
            if sql_case_reason(piece, mutated):
                equivalent += 1
                assert same, (piece, mutated)
            elif not same:
                refused_and_different += 1
    assert equivalent >= 2 and refused_and_different >= 1


def test_equivalents_reads_mutmuts_generated_functions(tmp_path, monkeypatch):
    """On a file mutated by mutmut itself: the lower-cased keywords piece is marked, the mutants that
    change an alias, wrap the string in XX or touch anything but a string are not."""
    from mutmut.mutation.file_mutation import mutate_file_contents

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "q.py").write_text("")
    (tmp_path / "pyproject.toml").write_text('[tool.mutmut]\nsource_paths = ["pkg"]\n')
    monkeypatch.chdir(tmp_path)  # mutmut reads its configuration from the working directory
    source = textwrap.dedent('''
        def totals(store, limit=3):
            return store.query("SELECT count(*) AS n FROM forwards LIMIT ?", [limit + 1])
    ''')
    generated = mutate_file_contents("pkg/q.py", source)
    code = {n: generated.code for n in generated.mutant_names}
    marked = equivalents(generated.code, list(generated.mutant_names), "pkg.q")
    assert len(code) >= 5
    assert list(marked) == [f"pkg.q.{n}" for n in generated.mutant_names if _mutant_string(generated.code, n)
                            == "select count(*) as n from forwards limit ?"]
    assert "keyword SELECT" in next(iter(marked.values()))


def _mutant_string(code: str, name: str) -> str | None:
    import ast

    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            strings = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            return strings[0] if strings else None
    return None
