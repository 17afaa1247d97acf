"""Every bad input of ``tests/bad_inputs.py`` ends as ``docs/bad_inputs.md`` says: its exit code
and one line, no traceback, no code run from a file; the page is that table, and the table only
grows."""

from __future__ import annotations

import re

import pytest

from gwtn_dist.cli import main
from tests.bad_inputs import CASES, DOC, ELSEWHERE, FLOOR, REPO, prepare, render

DOCUMENTED_CODES = {2, 3, 4, 74, 75, 130, 143}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.category.split()[0]}-{i}"
                                            for i, c in enumerate(CASES)])
def test_a_bad_input_ends_in_its_exit_code_and_one_line(case, tmp_path, shard_dir, capsys,
                                                         monkeypatch):
    argv, env, line = prepare(case, tmp_path, shard_dir)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        code = main(["-q", *argv])
    except SystemExit as exc:  # the parser's own refusals
        code = exc.code
    err = capsys.readouterr().err
    said = [x for x in err.splitlines() if x.strip() and not x.startswith("[gwtn ")]
    assert "Traceback" not in err, err
    assert len(said) == 1, err
    assert (code, said[0][:len(line)]) == (case.code, line)
    assert not (tmp_path / "code-ran").exists()  # no pickle in a file ran


def test_the_page_is_the_table_and_the_table_only_grows():
    assert DOC.read_text() == render(), "run: python -m tests.bad_inputs --write"
    assert len(CASES) >= FLOOR
    assert {c.code for c in CASES} <= DOCUMENTED_CODES
    assert len({(c.argv, tuple(c.env.items()), c.setup) for c in CASES}) == len(CASES)


def test_the_inputs_tested_apart_name_tests_that_exist():
    for _, _, _, test in ELSEWHERE:
        path, name = test.split("::")
        assert re.search(rf"^def {name}\(", (REPO / "tests" / path).read_text(), re.MULTILINE), \
            test
