"""scripts/mutation.py's own bookkeeping: a function whose text changed while its AST did not (a
`# pragma: no mutate` added, which renumbers its mutants) has its recorded results reset, so that no
result is read against another mutant than the one it was measured on."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from mutation import forget_renumbered  # noqa: E402

SOURCE = textwrap.dedent('''
    def kept(a):
        return a + 1


    class Box:
        def size(self, store):
            if getattr(store, "has_rollups", False):
                return 1
            return 2
''')


def test_a_pragma_resets_the_results_of_its_function_only(tmp_path):
    module = tmp_path / "mythos_probe" / "boxes.py"
    module.parent.mkdir()
    module.write_text(SOURCE)
    meta = tmp_path / "mutants" / "mythos_probe" / "boxes.py.meta"
    meta.parent.mkdir(parents=True)
    codes = {"mythos_probe.boxes.x_kept__mutmut_1": 1, "mythos_probe.boxes.x_kept__mutmut_2": 0,
             "mythos_probe.boxes.xǁBoxǁsize__mutmut_1": 1, "mythos_probe.boxes.xǁBoxǁsize__mutmut_2": 0}
    meta.write_text(json.dumps({"exit_code_by_key": codes, "hash_by_function_name": {}}))

    assert forget_renumbered("mythos_probe/boxes.py", tmp_path) == []  # the first run only records
    assert forget_renumbered("mythos_probe/boxes.py", tmp_path) == []  # nothing changed
    module.write_text(SOURCE.replace("False):", "False):  # pragma: no mutate (why)"))
    assert forget_renumbered("mythos_probe/boxes.py", tmp_path) == ["mythos_probe.boxes.xǁBoxǁsize__mutmut_1",
                                                                     "mythos_probe.boxes.xǁBoxǁsize__mutmut_2"]
    after = json.loads(meta.read_text())["exit_code_by_key"]
    assert after == {**codes, "mythos_probe.boxes.xǁBoxǁsize__mutmut_1": None,
                     "mythos_probe.boxes.xǁBoxǁsize__mutmut_2": None}
    assert forget_renumbered("mythos_probe/boxes.py", tmp_path) == []  # the new text is the record now


def test_a_changed_test_file_makes_mutmut_collect_its_test_map_again(tmp_path):
    """mutmut maps tests to the functions they run once per test name: a test file of the module's
    mapping that changed makes scripts/mutation.py delete that map, so that mutmut collects it anew."""
    from mutation import forget_stale_stats

    (tmp_path / "tests").mkdir()
    test = tmp_path / "tests" / "test_a.py"
    test.write_text("def test_a(): pass\n")
    stats = tmp_path / "mutants" / "mutmut-stats.json"
    stats.parent.mkdir()
    mapping = ["tests/test_a.py::test_a"]

    stats.write_text("{}")
    assert forget_stale_stats(tmp_path, mapping) and not stats.exists()  # never recorded: collected anew
    stats.write_text("{}")
    assert not forget_stale_stats(tmp_path, mapping) and stats.exists()  # unchanged: kept
    test.write_text("def test_a(): assert 1\n")
    assert forget_stale_stats(tmp_path, mapping) and not stats.exists()


def test_the_scores_list_each_sample_in_order_over_the_names_still_generated(tmp_path, monkeypatch, capsys):
    """benchmarks/mutation_scores.py: one line per sample (first, second, third), each scored over
    the names mutmut still generates; `--sample` runs the latest."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mutation_scores

    folder = tmp_path / "benchmarks" / "mutation_samples"
    folder.mkdir(parents=True)
    (folder / "collectors__boxes.txt").write_text("m.a\nm.b\nm.gone\n")
    (folder / "collectors__boxes.third.txt").write_text("m.c\nm.d\n")  # no second: skipped
    (folder / "collectors__boxes.second.txt").write_text("m.e\n")
    monkeypatch.setattr(mutation_scores, "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules["mutation"], "ROOT", tmp_path)
    samples = mutation_scores.samples_of("collectors/boxes.py")
    assert list(samples) == ["sample", "second sample", "third sample"]
    assert mutation_scores.sample_of("collectors/boxes.py") == ["m.c", "m.d"]

    statuses = {"m.a": "killed", "m.b": "survived", "m.c": "timeout", "m.d": "killed", "m.e": "no tests"}
    monkeypatch.setattr(mutation_scores, "statuses_of", lambda module: statuses)
    monkeypatch.setattr(mutation_scores, "equivalents_of", lambda module: {})
    (tmp_path / "pyproject.toml").write_text(
        '[tool.mythos-probe.mutation.tests]\n"collectors/boxes.py" = ["tests/x.py"]\n')
    mutation_scores.main([])
    import re

    rows = [re.match(r"\s*(.*?)\s+(\d+)\s+(\d+)\s+([\d.]+%)", line) for line in capsys.readouterr().out.splitlines()[1:]]
    lines = {m[1]: (m[2], m[3], m[4]) for m in rows}
    assert lines == {"collectors/boxes.py": ("3", "5", "60.0%"), "sample": ("1", "2", "50.0%"),  # m.gone left out
                     "second sample": ("0", "1", "0.0%"), "third sample": ("2", "2", "100.0%")}


def test_each_sample_is_drawn_from_the_mutants_outside_the_earlier_ones_with_its_own_seed(tmp_path, monkeypatch):
    import random

    import mutation

    monkeypatch.setattr(mutation, "ROOT", tmp_path)
    names = [f"m.x__mutmut_{i}" for i in range(40)]
    drawn = []
    for index, seed in enumerate((24, 25, 26, 27)):
        assert mutation.draw_sample("collectors/boxes.py", names, 10) == 0
        sample = mutation.sample_path("collectors/boxes.py", index).read_text().split()
        pool = sorted(set(names) - {n for d in drawn for n in d})
        assert sample == sorted(random.Random(seed).sample(pool, 10))
        drawn.append(sample)
    assert len({n for d in drawn for n in d}) == 40  # disjoint: every mutant once
    assert [p.name for p in sorted((tmp_path / "benchmarks" / "mutation_samples").iterdir())] == [
        "collectors__boxes.fourth.txt", "collectors__boxes.second.txt", "collectors__boxes.third.txt",
        "collectors__boxes.txt"]
    assert mutation.draw_sample("collectors/boxes.py", names, 10) == 1  # never a fifth, never a redraw
