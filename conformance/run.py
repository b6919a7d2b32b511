"""`make conformance`: transformers' and diffusers' own test mixins run on rar_hf's classes.

    python -m conformance [--suite transformers|diffusers] [-k EXPR] [--work DIR] [-- PYTEST_ARGS...]

Needs, besides the project's venv with its `conformance` extra (parameterized, requests-mock, pytest-timeout):
- the sdist of the installed transformers release (`pip download` into WORK/sdist on first use, or TF_SDIST=path):
  it ships tests/test_modeling_common.py and tests/test_configuration_common.py, exact to the release;
- a git snapshot of transformers holding TF_COMMIT (TF_GIT=dir) for tests/generation/test_utils.py, which no sdist
  ships, and one of diffusers holding DF_COMMIT (DF_GIT=dir) for its test helpers. Without TF_GIT / DF_GIT it looks
  for .mirror/<owner>+<name>/repo next to the repository or up to three folders above it.

Writes WORK (default .conformance/ in the repository, or $CONFORMANCE_WORK): upstream/ (the exported helpers and
SOURCES.txt, rebuilt every run), results/<suite>.log|json, results/summary.md. Exit status: 0 when no test failed
outside NOT_APPLICABLE (and, on a full run, no listed test passed and no entry is stale); 1 otherwise; 2 when a source
is missing or NOT_APPLICABLE is malformed (the message names what is missing and how to get it).
"""

import argparse
import glob
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys

from . import export, report

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TF_COMMIT = "2b296305d7bcf040831661b7b689e13a2e2e8d67"  # transformers main of 2026-08-20 (generation helpers)
DF_COMMIT = "58eb52c0803ea9af3abec60841c2a093bdf1f951"  # diffusers main of 2026-08-23 (all helpers)
SNAPSHOTS = {
    # env var: (what, .mirror folder name, commit, files needed from it)
    "TF_GIT": ("transformers", "zucchini-nlp+transformers", TF_COMMIT, "tests/generation/test_utils.py"),
    "DF_GIT": ("diffusers", "huggingface+diffusers", DF_COMMIT, "tests/models/testing_utils, tests/pipelines"),
}
# module the upstream helpers import -> the package that provides it (all in setup.cfg's `conformance` extra)
HELPER_MODULES = {"parameterized": "parameterized", "requests_mock": "requests-mock", "pytest_timeout": "pytest-timeout"}


class MissingSource(Exception):
    """One or more inputs are missing; `args` are the lines saying what and how to get each."""


def find_snapshot(repo, env_value, folder):
    """`(path or None, places looked)`: $TF_GIT/$DF_GIT when set, else .mirror/<folder>/repo next to or above `repo`."""
    if env_value:
        return env_value, [env_value]
    looked = []
    for up in ("..", os.path.join("..", ".."), os.path.join("..", "..", "..")):
        candidate = os.path.normpath(os.path.join(repo, up, ".mirror", folder, "repo"))
        looked.append(candidate)
        if os.path.isdir(candidate):
            return candidate, looked
    return None, looked


def has_commit(git_dir, commit):
    result = subprocess.run(["git", "-C", git_dir, "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    return result.returncode == 0


def check_snapshot(var, env, repo):
    """`(path, None)` or `(None, line saying what is missing and how to get it)`."""
    what, folder, commit, needed = SNAPSHOTS[var]
    path, looked = find_snapshot(repo, env.get(var), folder)
    if path is None:
        return None, (
            f"missing: a git snapshot of {what} holding commit {commit[:10]} (for {needed}). Set {var}=<git dir of a "
            f"{what} clone that has this commit> (git -C <dir> fetch origin {commit}); looked for {var} (unset) and "
            f"in {', '.join(looked)}."
        )
    if not os.path.isdir(path):
        return None, (
            f"missing: {var}={path} does not exist (a git snapshot of {what} holding commit {commit[:10]}, for "
            f"{needed}). Point {var} at the git directory of a {what} clone that has this commit."
        )
    if not has_commit(path, commit):
        return None, (
            f"missing: {var}={path} is not a git directory holding commit {commit[:10]} of {what} (for {needed}). "
            f"Fetch it (git -C {path} fetch origin {commit}) or point {var} at a clone that has it."
        )
    return path, None


def missing_modules(find_spec=importlib.util.find_spec):
    return [package for module, package in HELPER_MODULES.items() if find_spec(module) is None]


def find_sdist(env, work, version, download):
    """`(path, None)` or `(None, line)`. `download(version, directory)` returns `(ok, last line of its output)`."""
    name = f"transformers-{version}.tar.gz"
    how = (
        f"download it where the package index is reachable (python -m pip download --no-deps --no-binary :all: "
        f"transformers=={version} -d <dir>) and set TF_SDIST=<dir>/{name}"
    )
    if env.get("TF_SDIST"):
        if os.path.isfile(env["TF_SDIST"]):
            return env["TF_SDIST"], None
        return None, f"missing: TF_SDIST={env['TF_SDIST']} does not exist (the transformers {version} sdist); {how}."
    directory = os.path.join(work, "sdist")
    found = glob.glob(os.path.join(directory, name))
    if not found:
        os.makedirs(directory, exist_ok=True)
        ok, detail = download(version, directory)
        found = glob.glob(os.path.join(directory, name))
        if not ok or not found:
            return None, (
                f"missing: the transformers {version} source distribution (it ships tests/test_modeling_common.py and "
                f"tests/test_configuration_common.py); pip download into {directory} failed ({detail}); {how}."
            )
    return found[0], None


def pip_download(version, directory):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", directory,
         f"transformers=={version}"],
        capture_output=True, text=True,
    )  # fmt: skip
    lines = (result.stderr or result.stdout).strip().splitlines()
    return result.returncode == 0, (lines[-1] if lines else f"exit {result.returncode}")


def locate_sources(env, repo, work, download=None, find_spec=importlib.util.find_spec):
    """Every input of the run, or MissingSource listing all that are missing (each with how to get it)."""
    download = download or pip_download
    problems = []
    packages = missing_modules(find_spec)
    if packages:
        problems.append(
            f"missing: Python packages the upstream helpers import: {', '.join(packages)}. Install the project's "
            "`conformance` extra into the venv (make conformance does: pip install -c constraints.txt -e '.[conformance]')."
        )
    sources = {"tf_commit": TF_COMMIT, "df_commit": DF_COMMIT}
    for var, key in (("TF_GIT", "tf_git"), ("DF_GIT", "df_git")):
        sources[key], problem = check_snapshot(var, env, repo)
        if problem:
            problems.append(problem)
    version = importlib.metadata.version("transformers")
    sources["tf_version"] = version
    sources["tf_sdist"], problem = find_sdist(env, work, version, download)
    if problem:
        problems.append(problem)
    if problems:
        raise MissingSource(*problems)
    return sources


def run_suite(suite, work, pytest_args):
    """Run one suite in its own process (both upstreams call their helper package `tests`); returns its exit code."""
    results = os.path.join(work, "results")
    upstream = os.path.join(work, "upstream", suite)
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (upstream, env.get("PYTHONPATH")) if p),
        CONFORMANCE_UPSTREAM=upstream,
        CONFORMANCE_RESULTS=os.path.join(results, f"{suite}.json"),
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
    )  # fmt: skip
    # No -W filters: upstream tests assert on warnings (test_bc_cache_name_forward waits for a FutureWarning).
    command = [sys.executable, "-m", "pytest", os.path.join(HERE, "suites", suite), "-q", "-rfEX",
               "-p", "no:cacheprovider", "--timeout=600", *pytest_args]  # fmt: skip
    with open(os.path.join(results, f"{suite}.log"), "w") as log:
        # cwd = WORK: neither the repository root (whose tests/ folder would shadow upstream's `tests`) nor its ini
        return subprocess.call(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)


def header(sources):
    spec = importlib.util.find_spec("rar_hf")
    return [
        f"rar_hf under test: {os.path.dirname(spec.origin) if spec else '(not importable)'}",
        f"transformers {sources['tf_version']}: {os.path.basename(sources['tf_sdist'])} + generation helpers from "
        f"{sources['tf_git']} @ {sources['tf_commit'][:10]} (drift patches: see upstream/SOURCES.txt)",
        f"diffusers {importlib.metadata.version('diffusers')}: helpers from {sources['df_git']} @ {sources['df_commit'][:10]}",
        "",
    ]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m conformance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", action="append", choices=report.SUITES, help="run only this suite (repeatable)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression: run a subset (no stale-entry check)")
    parser.add_argument("--work", default=os.environ.get("CONFORMANCE_WORK", os.path.join(REPO, ".conformance")),
                        help="work folder (default .conformance/ or $CONFORMANCE_WORK)")  # fmt: skip
    parser.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments (no stale-entry check)")
    return parser.parse_args(argv)


def main(argv=None, env=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    work = os.path.abspath(args.work)
    try:
        with open(os.path.join(HERE, "NOT_APPLICABLE")) as f:
            entries = report.parse_not_applicable(f.read(), "conformance/NOT_APPLICABLE")
        sources = locate_sources(env, REPO, work)
    except report.NotApplicableError as error:
        print(f"conformance: {error}", file=sys.stderr)
        return 2
    except MissingSource as missing:
        print("conformance: cannot run, a source is missing:", file=sys.stderr)
        for line in missing.args:
            print(f"  - {line}", file=sys.stderr)
        return 2
    for folder in ("upstream", "results"):
        shutil.rmtree(os.path.join(work, folder), ignore_errors=True)
    os.makedirs(os.path.join(work, "results"))
    lines = export.export_all(sources, os.path.join(work, "upstream"))
    print(f"conformance: exported {sum(1 for l in lines if not l.startswith('#') and 'drift patch' not in l)} upstream "
          f"helper files into {os.path.join(work, 'upstream')}")  # fmt: skip
    pytest_args = (["-k", args.keyword] if args.keyword else []) + args.pytest_args
    exit_codes, records = {}, []
    for suite in args.suite or report.SUITES:
        print(f"conformance: running the {suite} suite (log: {os.path.join(work, 'results', suite + '.log')})", flush=True)
        exit_codes[suite] = run_suite(suite, work, pytest_args)
        path = os.path.join(work, "results", f"{suite}.json")
        if os.path.exists(path):
            with open(path) as f:
                records += json.load(f)
    full_run = not pytest_args and not args.suite
    text, ok = report.summarize(records, entries, exit_codes, full_run)
    text = "\n".join(header(sources)) + text
    with open(os.path.join(work, "results", "summary.md"), "w") as f:
        f.write(text)
    print(text, end="")
    print(f"conformance: summary in {os.path.join(work, 'results', 'summary.md')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
