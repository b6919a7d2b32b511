"""The logic of the conformance report: the NOT_APPLICABLE list, per-test outcomes, the summary, the verdict.

Pure Python on purpose (no torch, no upstream helpers): `tests/test_conformance_harness.py` checks it without the
snapshots, and the suites' conftest loads it by path to mark not-applicable tests.

Outcomes of one test (what `suites/conftest.py` records):
- `passed`: every (sub)test passed; `vacuous` when it never entered project code (see conftest);
- `failed`: a failure or an error in setup, call or any subtest, outside the not-applicable list;
- `skipped`: the upstream test skipped itself (its reason is kept);
- `not_applicable`: listed in NOT_APPLICABLE and failed, as expected (run as xfail: never patched);
- `not_applicable_passed`: listed in NOT_APPLICABLE but passed: the entry is wrong or stale, and fails the run.
"""

import collections
import fnmatch
import re

SUITES = ("transformers", "diffusers")
_ENTRY = re.compile(r"^(?P<pattern>\S+)\s+(?P<reason>\S.*)$")


class NotApplicableError(ValueError):
    pass


def parse_not_applicable(text, source="NOT_APPLICABLE"):
    """`{pattern: reason}` from the list's text.

    One entry a line: `<suite>::<test>` or `<suite>::<Class>::<test>`, whitespace, then the reason (one line, required).
    `<test>` may hold `*` / `?` wildcards (parameterized families); `#` starts a comment line. Any malformed line, an
    unknown suite or a repeated pattern is an error naming the line.
    """
    entries = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        match = _ENTRY.match(line)
        if match is None:
            raise NotApplicableError(f"{where}: expected '<suite>::[<Class>::]<test>  <reason>', got {line!r}")
        pattern, reason = match["pattern"], match["reason"].strip()
        parts = pattern.split("::")
        if len(parts) not in (2, 3) or not all(parts):
            raise NotApplicableError(f"{where}: {pattern!r} is not '<suite>::<test>' or '<suite>::<Class>::<test>'")
        if parts[0] not in SUITES:
            raise NotApplicableError(f"{where}: unknown suite {parts[0]!r} (expected one of {', '.join(SUITES)})")
        if not parts[-1].startswith("test"):
            raise NotApplicableError(f"{where}: {parts[-1]!r} is not a test name (test_...)")
        if len(reason) < 10:
            raise NotApplicableError(f"{where}: {pattern} needs a reason (one line saying why it cannot apply)")
        if pattern in entries:
            raise NotApplicableError(f"{where}: {pattern} is listed twice")
        entries[pattern] = reason
    return entries


def test_id(suite, cls, name):
    return f"{suite}::{cls}::{name}"


def not_applicable_entry(entries, suite, cls, name):
    """The pattern of `entries` that covers this test, or None (a class-specific entry wins over a suite-wide one)."""
    name = name.split("[", 1)[0]  # pytest parametrization ids, if any
    found = None
    for pattern in entries:
        parts = pattern.split("::")
        if parts[0] != suite or not fnmatch.fnmatchcase(name, parts[-1]):
            continue
        if len(parts) == 3:
            if parts[1] == cls:
                return pattern
        elif found is None:
            found = pattern
    return found


def skip_reason(record):
    """Why the test skipped, or None. A test whose every subtest skipped (the mixins loop over model classes in
    subtests and skip inside) is skipped too."""
    if record["skip_reason"] is not None:
        return record["skip_reason"]
    if record.get("subtest_skips") and not record.get("subtests_passed"):
        return record["subtest_skips"][0]
    return None


def classify(record, entries):
    """Outcome of one recorded test (see the module docstring). `record` is what conftest writes."""
    listed = not_applicable_entry(entries, record["suite"], record["cls"], record["name"])
    if record["failures"]:
        return "not_applicable" if listed else "failed"
    if skip_reason(record) is not None:
        return "skipped"
    if listed:
        return "not_applicable_passed"
    return "passed"


OUTCOMES = ("passed", "failed", "skipped", "not_applicable", "not_applicable_passed")


def summarize(records, entries, suites_run, full_run, problems=()):
    """`(text, ok)`: the human summary and the verdict.

    `records`: every recorded test; `suites_run`: the suites that ran (`{suite: pytest exit code}`); `full_run`: no
    `-k` selection, so that entries matching no test are reported as stale; `problems`: lines that already fail the run
    (e.g. a suite that recorded no test).
    """
    problems = list(problems)
    per_class = collections.defaultdict(collections.Counter)
    failures, na_hits, na_passed, vacuous = [], [], [], collections.defaultdict(list)
    skips = collections.defaultdict(list)
    used = set()
    for record in sorted(records, key=lambda r: (r["suite"], r["cls"], r["name"])):
        outcome = classify(record, entries)
        key = (record["suite"], record["cls"])
        per_class[key][outcome] += 1
        tid = test_id(record["suite"], record["cls"], record["name"])
        listed = not_applicable_entry(entries, record["suite"], record["cls"], record["name"])
        if listed:
            used.add(listed)
        if outcome == "failed":
            failures.append(f"{tid}: {record['failures'][0]}" + _more(record["failures"]))
        elif outcome == "not_applicable":
            na_hits.append(f"{tid}: {entries[listed]}")
        elif outcome == "not_applicable_passed":
            na_passed.append(f"{tid} passed but is listed as `{listed}` ({entries[listed]}): remove the entry")
        elif outcome == "skipped":
            skips[skip_reason(record)].append(f"{record['cls']}::{record['name']}")
        elif outcome == "passed" and not record.get("exercised", True):
            per_class[key]["vacuous"] += 1
            vacuous[key].append(record["name"])
    for suite, code in suites_run.items():
        if not any(r["suite"] == suite for r in records):
            problems.append(f"{suite}: pytest exited {code} and recorded no test (collection error? see its log)")
    stale = []
    if full_run:
        ran = set(suites_run)
        stale = [p for p in entries if p.split("::")[0] in ran and p not in used]

    out = ["# Conformance summary", ""]
    for suite in suites_run:
        out += [f"## {suite} (pytest exit {suites_run[suite]})", "",
                "| class | passed (vacuous) | failed | skipped | not applicable | not applicable, passed |",
                "|---|---|---|---|---|---|"]
        for (s, cls), c in sorted(per_class.items()):
            if s == suite:
                out.append(f"| {cls} | {c['passed']} ({c['vacuous']}) | {c['failed']} | {c['skipped']} | "
                           f"{c['not_applicable']} | {c['not_applicable_passed']} |")
        out.append("")
    totals = collections.Counter()
    for c in per_class.values():
        totals.update(c)
    out += [f"Totals: {totals['passed']} passed ({totals['vacuous']} vacuous), {totals['failed']} failed, "
            f"{totals['skipped']} skipped, {totals['not_applicable']} not applicable, "
            f"{totals['not_applicable_passed']} not applicable but passed", ""]
    out += _section("Failures (outside NOT_APPLICABLE)", failures)
    out += _section("Not applicable, failed as expected (NOT_APPLICABLE)", na_hits)
    out += _section("Listed as not applicable but PASSED (the list must shrink)", na_passed)
    out += _section("NOT_APPLICABLE entries that matched no test (stale)", stale)
    out += _section("Passed without entering project code (vacuous)",
                    [f"{s}::{cls}: {', '.join(names)}" for (s, cls), names in sorted(vacuous.items())])
    out += _section("Skip reasons", [f"({len(names)}) {reason}: {_shown(names)}"
                                     for reason, names in sorted(skips.items(), key=lambda kv: (-len(kv[1]), kv[0]))])
    out += _section("Problems", problems)
    ok = not failures and not na_passed and not stale and not problems and bool(records)
    verdict = "PASS" if ok else "FAIL"
    out.append(f"{verdict}: {len(failures)} failure(s) outside NOT_APPLICABLE, {len(na_passed)} not-applicable "
               f"test(s) passed, {len(stale)} stale entr(y/ies), {len(problems)} problem(s)")
    return "\n".join(out) + "\n", ok


def _more(items):
    return f" (+{len(items) - 1} more)" if len(items) > 1 else ""


def _shown(names, limit=6):
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def _section(title, lines):
    return [f"### {title} ({len(lines)})", ""] + [f"- {line}" for line in lines] + [""]
