"""Settings of the conformance suites, the NOT_APPLICABLE marks and the per-test record the summary is built from.

Run through `conformance/run.py` (`make conformance`): it exports the upstream helpers, puts them on PYTHONPATH as the
`tests` package and sets CONFORMANCE_UPSTREAM / CONFORMANCE_RESULTS.

- offline, one torch thread, a fixed seed per test; the markers the upstream helpers use are registered;
- tests listed in ../NOT_APPLICABLE run as non-strict xfail with the list's reason (they are never patched or
  skipped, so one that starts to pass is seen);
- every test's outcome is written to $CONFORMANCE_RESULTS (JSON): failures of any phase or subtest, the skip reason,
  and whether the test entered project code at all ("vacuous" when not).
"""

import importlib.util
import json
import os
import pathlib
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import rar_hf  # noqa: E402

torch.set_num_threads(1)

HERE = pathlib.Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("conformance_report", HERE.parent / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)
NOT_APPLICABLE = report.parse_not_applicable(
    pathlib.Path(os.environ.get("CONFORMANCE_NOT_APPLICABLE", HERE.parent / "NOT_APPLICABLE")).read_text()
)

# Markers the upstream helpers decorate tests with (upstream registers them in its own root conftest / pyproject).
UPSTREAM_MARKERS = [
    "generate", "is_training_test", "torch_compile_test", "torch_export_test", "flash_attn_test", "flash_attn_3_test",
    "flash_attn_4_test", "is_pipeline_test", "is_staging_test", "accelerate_tests", "not_device_test", "bitsandbytes",
    "quantization", "compile", "attention", "memory", "cpu_offload", "group_offload", "lora", "single_file", "training",
    "context_parallel", "slow", "nightly", "big_accelerator", "is_torch_compile", "is_flaky", "quanto", "bfl",
    "gguf", "torchao", "modelopt", "ip_adapter", "cache", "hub", "export",
]  # fmt: skip


def pytest_configure(config):
    upstream = os.environ.get("CONFORMANCE_UPSTREAM")
    if not upstream:
        raise pytest.UsageError("run the conformance suites through conformance/run.py (`make conformance`)")
    names = set(UPSTREAM_MARKERS)
    for path in pathlib.Path(upstream).rglob("*.py"):
        names.update(re.findall(r"pytest\.mark\.([A-Za-z_][A-Za-z0-9_]*)", path.read_text(errors="ignore")))
    for marker in sorted(names - {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings", "timeout"}):
        config.addinivalue_line("markers", f"{marker}: upstream marker")


def _where(item):
    suite = pathlib.Path(str(item.path)).parent.name
    cls = item.cls.__name__ if item.cls is not None else pathlib.Path(str(item.path)).stem
    return suite, cls


def pytest_collection_modifyitems(config, items):
    for item in items:
        suite, cls = _where(item)
        pattern = report.not_applicable_entry(NOT_APPLICABLE, suite, cls, item.name)
        if pattern:
            item.add_marker(pytest.mark.xfail(reason=f"NOT_APPLICABLE {pattern}: {NOT_APPLICABLE[pattern]}", strict=False))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ------------------------------------------------------------------------------------------------------------------
# The record. A mixin test can pass without touching the model under test (it `continue`s past model classes that lack
# a feature, e.g. get_image_features); the profiler notes whether any function of the project (files under rar_hf/
# other than configuration_rar.py, since building a config alone exercises nothing) was entered during the call.
_PROJECT_DIR = os.path.dirname(rar_hf.__file__)
_RECORDS = {}
# Tests that check something other than the project's model code run in the call phase: the config class itself, and
# diffusers' test_output, which checks a class-scoped fixture computed during setup (outside the profiler's window).
_EXERCISED_ANYWAY = {"test_config", "test_output"}


def _record(item):
    suite, cls = _where(item)
    return _RECORDS.setdefault(
        item.nodeid,
        {"suite": suite, "cls": cls, "name": item.name, "failures": [], "skip_reason": None, "subtest_skips": [],
         "subtests_passed": 0, "exercised": item.name in _EXERCISED_ANYWAY},
    )  # fmt: skip


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    record = _record(item)

    def profiler(frame, event, arg):
        name = frame.f_code.co_filename
        if event == "call" and name.startswith(_PROJECT_DIR) and not name.endswith("configuration_rar.py"):
            record["exercised"] = True
            sys.setprofile(None)

    sys.setprofile(profiler)
    try:
        yield
    finally:
        sys.setprofile(None)


def _message(report_):
    """First line of the failure, with where it was raised (file:line, the deepest frame) and the subtest, if any."""
    longrepr = report_.longrepr
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        text = (crash.message or "").strip().splitlines()[0] if crash.message else ""
        where = f" (at {os.path.basename(crash.path)}:{crash.lineno})"
    elif isinstance(longrepr, tuple):
        text, where = str(longrepr[2]).strip(), ""
    else:
        text, where = (str(longrepr).strip().splitlines() or [""])[-1], ""
    context = getattr(report_, "context", None)
    prefix = f"[{context.msg}] " if context is not None and getattr(context, "msg", None) else ""
    return f"{prefix}{text[:300]}{where}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item, call):
    _record(item)  # every collected test that runs has a record, even one that fails in setup


def pytest_runtest_logreport(report):
    record = _RECORDS.get(report.nodeid)
    if record is None:
        return
    if report.failed:
        record["failures"].append(("" if report.when == "call" else f"in {report.when}: ") + _message(report))
    elif report.skipped and hasattr(report, "wasxfail"):
        # A listed (xfail) test that failed: keep its failure so the summary can show what failed.
        record["failures"].append(_message(report))
    elif report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ").strip()
        if getattr(report, "context", None) is None:
            record["skip_reason"] = reason
        else:
            record["subtest_skips"].append(reason)
    elif report.passed and getattr(report, "context", None) is not None:
        record["subtests_passed"] += 1


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("CONFORMANCE_RESULTS")
    if out:
        with open(out, "w") as f:
            json.dump(list(_RECORDS.values()), f, indent=1)
