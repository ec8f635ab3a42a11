"""The contract behaviours that test docstrings cite are written down in docs/contract.md.

A docstring cites a behaviour by number ("Behaviour 8's boundary", "Contract behaviours
1-9 and 22-25", "behaviours 7 (sync half), 20 and 21", "contract 5") or a section by
its heading ("Contract, Semantics"). A reader looks either up in docs/contract.md,
where each behaviour also lists the test files that cite it; these tests keep the two
in step, both ways.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ROOT / "docs" / "contract.md"

#: "behaviour 17", "Behaviours 15-18", "contract 5": the word, up to the first number.
CITATION = re.compile(r"\b(?:behaviou?rs?|contract)\s+(?=\d)", re.IGNORECASE)
#: One number or a range of them ("1-9").
NUMBERS = re.compile(r"(\d+)(?:\s*[-–]\s*(\d+))?")
#: What joins the numbers of one citation: a comma or "and", maybe after a remark in
#: parentheses ("7 (sync half), 20 and 21").
JOINER = re.compile(r"\s*(?:\([^)]*\))?\s*(?:,|\band\b)\s*(?=\d)")
#: "Contract, Semantics": a section of docs/contract.md by its heading.
SECTION = re.compile(r"\bContract, ([A-Z][a-z]+)")
#: A numbered behaviour in docs/contract.md, and the test files listed under it.
BEHAVIOUR = re.compile(r"^(\d+)\. (.*?)(?=^\d+\. |\Z)", re.MULTILINE | re.DOTALL)
LISTED_FILE = re.compile(r"`(tests/[\w/]+\.py)`")


def cited_numbers(text: str) -> set[int]:
    """Every behaviour number ``text`` cites."""
    numbers: set[int] = set()
    for citation in CITATION.finditer(text):
        position = citation.end()
        while (number := NUMBERS.match(text, position)) is not None:
            first = int(number[1])
            numbers.update(range(first, int(number[2] or first) + 1))
            joiner = JOINER.match(text, number.end())
            if joiner is None:
                break
            position = joiner.end()
    return numbers


def docstrings() -> Iterator[tuple[str, str, str]]:
    """(file, where in it, docstring) for every module, class and function under tests/."""
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path == Path(__file__):  # its own docstring shows citations, it makes none
            continue
        file = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), file)):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                docstring = ast.get_docstring(node)
                if docstring:
                    yield file, getattr(node, "name", "module docstring"), docstring


def citing_files() -> dict[int, set[str]]:
    """Behaviour number -> the test files whose docstrings cite it."""
    files: dict[int, set[str]] = {}
    for file, _, docstring in docstrings():
        for number in cited_numbers(docstring):
            files.setdefault(number, set()).add(file)
    return files


def written_behaviours() -> dict[int, set[str]]:
    """Behaviour number -> the test files docs/contract.md lists under it."""
    section = CONTRACT.read_text().split("\n## Behaviours", 1)[1]
    return {int(item[1]): set(LISTED_FILE.findall(item[2])) for item in BEHAVIOUR.finditer(section)}


#: The citation forms the suite uses, and what each cites.
CITATION_FORMS: dict[str, set[int]] = {
    "Behaviour 1.": {1},
    "Behaviour 8's boundary: 99 characters": {8},
    "Behaviour 10, normal channel: a reader": {10},
    "Contract behaviours 1-9 and 22-25: sending": {*range(1, 10), *range(22, 26)},
    "Contract behaviours 7 (sync half), 20 and 21: one layer": {7, 20, 21},
    'Behaviour 23 (and the contract\'s "at least 1 MB must pass").': {23},
    "as contract 5 says": {5},
    "capacity 3, expiry 1 s, the contract's numbers": set(),
}


@pytest.mark.parametrize(("text", "numbers"), CITATION_FORMS.items(), ids=list(CITATION_FORMS))
def test_citations_are_read_as_written(text: str, numbers: set[int]) -> None:
    assert cited_numbers(text) == numbers


def test_behaviours_are_numbered_from_one_without_gaps() -> None:
    numbers = list(written_behaviours())
    assert numbers == list(range(1, len(numbers) + 1)), numbers
    assert len(numbers) >= 26, "docs/contract.md lost behaviours the tests were written for"


def test_every_cited_behaviour_is_written_down() -> None:
    written = written_behaviours().keys()
    unknown = [
        f"{file}::{where} cites {sorted(numbers - written)}"
        for file, where, docstring in docstrings()
        if (numbers := cited_numbers(docstring)) - written
    ]
    assert not unknown, "not in docs/contract.md:\n" + "\n".join(unknown)


def test_every_cited_section_is_written_down() -> None:
    headings = set(re.findall(r"^## (\w+)", CONTRACT.read_text(), re.MULTILINE))
    unknown = [
        f"{file}::{where} cites {section!r}"
        for file, where, docstring in docstrings()
        for section in SECTION.findall(docstring)
        if section not in headings
    ]
    listing = "\n".join(unknown)
    assert not unknown, f"not a heading of docs/contract.md {sorted(headings)}:\n{listing}"


def test_every_written_behaviour_is_tested_where_the_contract_says() -> None:
    """Each behaviour lists exactly the files whose docstrings cite it (so none is untested)."""
    citing = citing_files()
    wrong = {
        number: {"listed": sorted(listed), "citing": sorted(citing.get(number, set()))}
        for number, listed in written_behaviours().items()
        if listed != citing.get(number, set()) or not listed
    }
    assert not wrong, f"docs/contract.md lists other test files than cite these: {wrong}"
