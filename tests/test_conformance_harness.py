"""The `make conformance` harness (conformance/), without the upstream snapshots: the NOT_APPLICABLE list, the
"missing source" messages, the per-test record the suites' conftest writes, and the summary's verdict."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from conformance import export, report, run  # noqa: E402

pytest_plugins = ["pytester"]


# ------------------------------------------------------------------------------------------------ NOT_APPLICABLE
def test_not_applicable_list_parses():
    entries = report.parse_not_applicable(
        "# comment\n\ntransformers::test_a  a reason that explains it\n"
        "transformers::RARModelTest::test_b_*  another reason, class only\n"
    )
    assert entries == {
        "transformers::test_a": "a reason that explains it",
        "transformers::RARModelTest::test_b_*": "another reason, class only",
    }


@pytest.mark.parametrize(
    "line, expected",
    [
        ("transformers::test_a", "expected '<suite>::[<Class>::]<test>  <reason>'"),
        ("transformers::test_a  short", "needs a reason"),
        ("jax::test_a  a reason that explains it", "unknown suite 'jax'"),
        ("transformers::RARModelTest  a reason that explains it", "'RARModelTest' is not a test name"),
        ("transformers  a reason that explains it", "is not '<suite>::<test>'"),
    ],
)
def test_not_applicable_list_rejects_a_bad_line_naming_it(line, expected):
    with pytest.raises(report.NotApplicableError, match=r"^NA:2: .*") as error:
        report.parse_not_applicable(f"# header\n{line}\n", "NA")
    assert expected in str(error.value)


def test_not_applicable_list_rejects_a_repeated_entry():
    with pytest.raises(report.NotApplicableError, match="NA:2: transformers::test_a is listed twice"):
        report.parse_not_applicable("transformers::test_a  first reason here\ntransformers::test_a  again, twice\n", "NA")


def test_shipped_not_applicable_list_is_valid():
    entries = report.parse_not_applicable((REPO / "conformance" / "NOT_APPLICABLE").read_text())
    assert entries and all(pattern.split("::")[0] in report.SUITES for pattern in entries)


def test_not_applicable_matching_prefers_the_class_entry_and_expands_wildcards():
    entries = {"transformers::test_x_*": "suite wide", "transformers::B::test_x_1": "class B only"}
    assert report.not_applicable_entry(entries, "transformers", "A", "test_x_1") == "transformers::test_x_*"
    assert report.not_applicable_entry(entries, "transformers", "B", "test_x_1") == "transformers::B::test_x_1"
    assert report.not_applicable_entry(entries, "transformers", "A", "test_y") is None
    assert report.not_applicable_entry(entries, "diffusers", "A", "test_x_1") is None


# ------------------------------------------------------------------------------------------------------ summary
def record(name, cls="RARModelTest", suite="transformers", failures=(), skip=None, exercised=True):
    return {"suite": suite, "cls": cls, "name": name, "failures": list(failures), "skip_reason": skip,
            "subtest_skips": [], "subtests_passed": 0, "exercised": exercised}  # fmt: skip


NA = {"transformers::test_na": "cannot apply to image tokens", "transformers::test_na_unused": "matches no test here"}


def test_summary_passes_with_failures_only_on_the_not_applicable_list():
    records = [record("test_ok"), record("test_na", failures=["ValueError: no"]), record("test_s", skip="no GPU"),
               record("test_idle", exercised=False), record("test_na_unused", failures=["x"])]  # fmt: skip
    text, ok = report.summarize(records, NA, {"transformers": 1}, full_run=True)
    assert ok, text
    assert "| RARModelTest | 2 (1) | 0 | 1 | 2 | 0 |" in text
    assert "- transformers::RARModelTest::test_na: cannot apply to image tokens" in text
    assert "- (1) no GPU: RARModelTest::test_s" in text
    assert "- transformers::RARModelTest: test_idle" in text  # vacuous pass, reported
    assert text.rstrip().splitlines()[-1].startswith("PASS: 0 failure(s)")


def test_summary_fails_on_a_failure_outside_the_list():
    records = [record("test_ok"), record("test_bad", failures=["AssertionError: 1 != 2 (at x.py:3)", "[sub] again"])]
    text, ok = report.summarize(records, {}, {"transformers": 1}, full_run=False)
    assert not ok
    assert "- transformers::RARModelTest::test_bad: AssertionError: 1 != 2 (at x.py:3) (+1 more)" in text
    assert text.rstrip().splitlines()[-1].startswith("FAIL: 1 failure(s)")


def test_summary_fails_when_a_listed_test_passes_or_an_entry_is_stale():
    text, ok = report.summarize([record("test_na")], NA, {"transformers": 0}, full_run=True)
    assert not ok
    assert "test_na passed but is listed as `transformers::test_na`" in text and "remove the entry" in text
    assert "- transformers::test_na_unused" in text  # stale: matched no test on a full run
    # a subset run (-k) does not call unmatched entries stale
    records = [record("test_na", failures=["x"])]
    assert report.summarize(records, NA, {"transformers": 1}, full_run=False)[1]


def test_summary_fails_when_a_suite_records_nothing():
    text, ok = report.summarize([record("test_ok")], {}, {"transformers": 0, "diffusers": 2}, full_run=False)
    assert not ok and "diffusers: pytest exited 2 and recorded no test" in text
    assert not report.summarize([], {}, {}, full_run=False)[1]  # nothing ran at all is never a pass


# ------------------------------------------------------------------------------------------------ missing sources
def test_every_missing_source_is_named_with_how_to_get_it(tmp_path):
    repo = tmp_path / "a" / "b" / "repo"
    repo.mkdir(parents=True)

    def no_download(version, directory):
        return False, "ERROR: No matching distribution found"

    with pytest.raises(run.MissingSource) as missing:
        run.locate_sources({}, str(repo), str(tmp_path / "work"), download=no_download,
                           find_spec=lambda name: None if name == "parameterized" else object())  # fmt: skip
    lines = missing.value.args
    assert len(lines) == 4, lines
    assert "parameterized" in lines[0] and "requests-mock" not in lines[0] and "[conformance]" in lines[0]
    assert "TF_GIT" in lines[1] and run.TF_COMMIT[:10] in lines[1] and "tests/generation/test_utils.py" in lines[1]
    assert str(tmp_path / "a" / ".mirror" / "zucchini-nlp+transformers" / "repo") in lines[1]  # where it looked
    assert "DF_GIT" in lines[2] and run.DF_COMMIT[:10] in lines[2]
    assert "source distribution" in lines[3] and "No matching distribution found" in lines[3]
    assert "pip download --no-deps --no-binary :all: transformers==" in lines[3] and "TF_SDIST=" in lines[3]


def test_a_snapshot_without_the_pinned_commit_is_refused(tmp_path):
    mirror = tmp_path / ".mirror" / "huggingface+diffusers" / "repo"
    mirror.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "--bare", str(mirror)], check=True)
    repo = tmp_path / "repo"
    repo.mkdir()
    assert run.find_snapshot(str(repo), None, "huggingface+diffusers")[0] == str(mirror)
    path, problem = run.check_snapshot("DF_GIT", {}, str(repo))
    assert path is None and f"DF_GIT={mirror} is not a git directory holding commit {run.DF_COMMIT[:10]}" in problem
    assert f"git -C {mirror} fetch origin {run.DF_COMMIT}" in problem
    path, problem = run.check_snapshot("TF_GIT", {"TF_GIT": str(tmp_path / "nowhere")}, str(repo))
    assert path is None and f"TF_GIT={tmp_path / 'nowhere'} does not exist" in problem


def test_main_exits_2_and_says_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "REPO", str(tmp_path))
    env = {"TF_SDIST": str(tmp_path / "nope.tar.gz")}
    assert run.main(["--work", str(tmp_path / "work")], env=env) == 2
    err = capsys.readouterr().err
    assert err.startswith("conformance: cannot run, a source is missing:")
    assert f"TF_SDIST={tmp_path / 'nope.tar.gz'} does not exist" in err
    assert "TF_GIT" in err and "DF_GIT" in err
    assert not (tmp_path / "work" / "results").exists()  # nothing ran


# ------------------------------------------------------------------------------------------------ export
def test_drift_patches_apply_exactly_or_refuse(tmp_path):
    (tmp_path / "f.py").write_text("a = 1\na = 1\n")
    log = []
    export.apply_drift_patches(str(tmp_path), log, {"f.py": [("a = 1", "a = 2", 2)]})
    assert (tmp_path / "f.py").read_text() == "a = 2\na = 2\n" and len(log) == 1
    with pytest.raises(SystemExit, match=r"expected 2 x 'a = 2', found 0"):
        export.apply_drift_patches(str(tmp_path), log, {"f.py": [("a = 2", "a = 3", 2), ("a = 2", "a = 4", 2)]})


def test_export_follows_relative_and_tests_imports():
    text = "from .x import y\nfrom ..common import z\nfrom tests.utils import helper\nimport tests.deep.mod\nimport os\n"
    modules = export.imported_modules("tests/models/test_a.py", text)
    assert {"tests.models.x", "tests.models.x.y", "tests.common", "tests.utils", "tests.deep.mod"} <= set(modules)
    assert not any(m.startswith("os") for m in modules)


# ------------------------------------------------------------------------------------------ the suites' record
FAKE_SUITE = '''
import unittest

from rar_hf.generation_rar import guidance_scales


class FakeTest(unittest.TestCase):
    def test_exercised(self):
        guidance_scales(2, 2.0)

    def test_idle(self):
        pass

    def test_fails(self):
        raise ValueError("boom")

    def test_subtest_fails(self):
        for name in ("A", "B"):
            with self.subTest(name):
                self.assertEqual(name, "A")

    def test_skips(self):
        self.skipTest("needs a GPU")

    def test_all_subtests_skip(self):
        for name in ("A", "B"):
            with self.subTest(name):
                self.skipTest(f"{name} lacks the feature")

    def test_some_subtests_skip(self):
        for name in ("A", "B"):
            with self.subTest(name):
                if name == "B":
                    self.skipTest("B lacks the feature")

    def test_listed_fails(self):
        raise ValueError("cannot apply")

    def test_listed_subtest_fails(self):
        for name in ("A", "B"):
            with self.subTest(name):
                self.assertEqual(name, "A")

    def test_listed_passes(self):
        guidance_scales(2, 2.0)
'''


def test_conftest_records_each_outcome_and_marks_listed_tests(pytester, monkeypatch, tmp_path):
    import torch

    threads = torch.get_num_threads()
    listed = tmp_path / "NOT_APPLICABLE"
    listed.write_text("transformers::test_listed_*  listed for this test of the harness\n")
    results = tmp_path / "results.json"
    monkeypatch.setenv("CONFORMANCE_NOT_APPLICABLE", str(listed))
    monkeypatch.setenv("CONFORMANCE_UPSTREAM", str(tmp_path))
    monkeypatch.setenv("CONFORMANCE_RESULTS", str(results))
    conftest = REPO / "conformance" / "suites" / "conftest.py"
    pytester.makeconftest(  # the suites' conftest, run from its own path (it finds report.py beside it)
        f"import runpy\nglobals().update((k, v) for k, v in runpy.run_path({str(conftest)!r}).items() if k[:2] != '__')\n"
    )
    (pytester.path / "transformers").mkdir()
    (pytester.path / "transformers" / "test_fake.py").write_text(FAKE_SUITE)
    try:
        pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "transformers")
    finally:
        torch.set_num_threads(threads)
    records = {r["name"]: r for r in json.loads(results.read_text())}
    outcomes = {name: report.classify(r, report.parse_not_applicable(listed.read_text())) for name, r in records.items()}
    assert outcomes == {
        "test_exercised": "passed",
        "test_idle": "passed",
        "test_fails": "failed",
        "test_subtest_fails": "failed",
        "test_skips": "skipped",
        "test_all_subtests_skip": "skipped",
        "test_some_subtests_skip": "passed",
        "test_listed_fails": "not_applicable",
        "test_listed_subtest_fails": "not_applicable",  # a failing subtest under xfail is not an unexpected pass
        "test_listed_passes": "not_applicable_passed",
    }
    assert records["test_exercised"]["exercised"] and not records["test_idle"]["exercised"]
    line = FAKE_SUITE.splitlines().index('        raise ValueError("boom")') + 1
    assert records["test_fails"]["failures"] == [f"ValueError: boom (at test_fake.py:{line})"]  # where it was raised
    assert records["test_subtest_fails"]["failures"][0].startswith("[B] AssertionError: 'B' != 'A'")
    assert records["test_skips"]["skip_reason"] == "needs a GPU"
    assert report.skip_reason(records["test_all_subtests_skip"]) == "A lacks the feature"
    assert records["test_listed_fails"]["failures"][0].startswith("ValueError: cannot apply (at test_fake.py:")
    assert {r["suite"] for r in records.values()} == {"transformers"}
    assert {r["cls"] for r in records.values()} == {"FakeTest"}
    assert os.environ["CONFORMANCE_RESULTS"] == str(results)
