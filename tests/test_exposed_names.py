"""Tool names where several servers meet: ``<prefix>__<tool>``, within the MCP rule and the
client budget, the same for one catalog whoever computes them."""

from __future__ import annotations

import hashlib
import re

import pytest

from external_mcp.exposed_names import PREFIX_MAX_CHARS, derive_prefix, exposed_names, prefix_problem

RULE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


@pytest.mark.parametrize(("name", "taken", "prefix"), [
    ("GitHub", set(), "github"),
    ("Acme CRM (prod)", set(), "acme-crm-prod"),
    ("  __Weird__  name__ ", set(), "weird_name"),
    ("Café Système", set(), "cafe-systeme"),
    ("数据", set(), "server"),
    ("GitHub", {"github"}, "github-2"),
    ("GitHub", {"github", "github-2"}, "github-3"),
    ("x" * 40, {"x" * PREFIX_MAX_CHARS}, "x" * (PREFIX_MAX_CHARS - 2) + "-2"),
])
def test_a_prefix_is_derived_from_the_name_and_unique(name, taken, prefix):
    assert derive_prefix(name, taken) == prefix
    assert prefix_problem(prefix) is None


@pytest.mark.parametrize("bad", ["", "A", "a__b", "-a", "a-", "a_", "a b", "a.b", "x" * (PREFIX_MAX_CHARS + 1)])
def test_a_prefix_that_could_make_names_ambiguous_is_refused(bad):
    assert prefix_problem(bad)


def test_names_within_the_rule_and_the_budget_are_prefixed_as_they_are():
    assert exposed_names("gh", ["create_issue", "search.code", "a-b"], max_chars=64) == {
        "a-b": "gh__a-b", "create_issue": "gh__create_issue", "search.code": "gh__search.code"}


def test_other_names_get_a_deterministic_short_form_within_the_budget():
    long = "summarise_" + "very_" * 20 + "long"
    odd = "files/read file"
    names = exposed_names("acme-crm", [long, odd, "ok"], max_chars=64)
    assert names["ok"] == "acme-crm__ok"
    for original in (long, odd):
        digest = hashlib.sha256(original.encode()).hexdigest()[:8]
        assert names[original].startswith("acme-crm__") and names[original].endswith("_" + digest)
        assert RULE.fullmatch(names[original]) and len(names[original]) <= 64
    assert names[odd] == f"acme-crm__files_read_file_{hashlib.sha256(odd.encode()).hexdigest()[:8]}"
    assert exposed_names("acme-crm", [odd, "ok", long], max_chars=64) == names  # order does not matter


def test_a_name_crafted_to_equal_another_short_form_does_not_take_its_place():
    odd = "a b"
    crafted = exposed_names("p", [odd], max_chars=64)[odd].removeprefix("p__")
    names = exposed_names("p", [odd, crafted], max_chars=64)
    assert names[crafted] == "p__" + crafted  # the name within the rule keeps its own
    assert names[odd] != names[crafted] and len(set(names.values())) == 2


def test_refused_names_are_never_exposed():
    assert exposed_names("p", ["ok", "bad\x00name", " padded", "x" * 129], max_chars=64) == {"ok": "p__ok"}


def test_the_first_separator_always_ends_the_prefix():
    """No prefix contains or ends next to ``__``: "a__b__c" can only be tool "b__c" of prefix "a"."""
    assert prefix_problem("a__b") and prefix_problem("a_") and prefix_problem("_a")
    assert exposed_names("a", ["b__c"], max_chars=64) == {"b__c": "a__b__c"}
