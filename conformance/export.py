"""Export the upstream test helpers our testers import, and nothing else (they are never copied into this repository).

For each upstream (transformers, diffusers) we start from a few entry files and follow every relative import and every
absolute `tests.` import (transitively), copying each module out of its source:

- the *sdist* of the installed transformers release (`pip download --no-binary :all:`) when it ships the file
  (`tests/test_modeling_common.py`, `tests/test_configuration_common.py`: exact to the release);
- otherwise a *git snapshot* of the public repository at a pinned commit (`tests/generation/test_utils.py` is not in
  the sdist; diffusers' sdist ships no test helpers at all).

Version-drift patches (`DRIFT_PATCHES`) adapt the snapshot's generation helpers to the installed release; each must
match an exact number of times, so a different upstream file fails loudly instead of being half patched. They patch
version drift only, never a test's expectations: a test that cannot apply to RAR goes in `NOT_APPLICABLE`.
"""

import ast
import os
import subprocess
import tarfile


class Source:
    """Files of one upstream: an sdist first (when given), then a git snapshot at `commit`."""

    def __init__(self, sdist=None, git_dir=None, commit=None):
        self.sdist, self.git_dir, self.commit = sdist, git_dir, commit
        self._tar_members = {}
        if sdist:
            self._tar = tarfile.open(sdist)
            for member in self._tar.getmembers():
                if member.isfile() and "/" in member.name:
                    self._tar_members[member.name.split("/", 1)[1]] = member  # strip "pkg-x.y.z/"
        self._git_files = set()
        if git_dir:
            out = subprocess.run(
                ["git", "-C", git_dir, "ls-tree", "-r", "--name-only", commit], capture_output=True, text=True, check=True
            ).stdout
            self._git_files = set(out.split())

    def read(self, path):
        """`(text, origin)` of `path`, or `(None, None)`."""
        if path in self._tar_members:
            text = self._tar.extractfile(self._tar_members[path]).read().decode()
            return text, f"sdist:{os.path.basename(self.sdist)}"
        if path in self._git_files:
            text = subprocess.run(
                ["git", "-C", self.git_dir, "show", f"{self.commit}:{path}"], capture_output=True, text=True, check=True
            ).stdout
            return text, f"git:{self.commit[:12]}"
        return None, None

    def exists(self, path):
        return path in self._tar_members or path in self._git_files


def module_to_path(source, dotted):
    base = dotted.replace(".", "/")
    for candidate in (base + ".py", base + "/__init__.py"):
        if source.exists(candidate):
            return candidate
    return None


def imported_modules(path, text):
    """Dotted names of the local modules `path` imports (relative imports and absolute `tests.` imports)."""
    package = os.path.dirname(path).replace("/", ".")
    modules = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(parts)
                target = f"{base}.{node.module}" if node.module else base
            elif node.module and (node.module == "tests" or node.module.startswith("tests.")):
                target = node.module
            else:
                continue
            modules.append(target)
            modules.extend(f"{target}.{alias.name}" for alias in node.names)  # `from package import submodule`
        elif isinstance(node, ast.Import):
            modules.extend(alias.name for alias in node.names if alias.name.startswith("tests."))
    return modules


def export(source, entries, out_root, log):
    """Copy `entries` and every local module they import (transitively) under `out_root`."""
    todo, seen = list(entries), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        text, origin = source.read(path)
        if text is None:
            raise SystemExit(f"missing upstream file {path} in {source.sdist or ''} {source.git_dir or ''}".strip())
        dest = os.path.join(out_root, path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "w") as f:
            f.write(text)
        log.append(f"{path}\t{origin}")
        directory = os.path.dirname(path)
        while directory:  # the package __init__ files on the way
            init = f"{directory}/__init__.py"
            if init not in seen:
                if source.exists(init):
                    todo.append(init)
                else:
                    seen.add(init)
                    open(os.path.join(out_root, init), "w").close()
                    log.append(f"{init}\t(created empty)")
            directory = os.path.dirname(directory)
        if path.endswith(".py"):
            for module in imported_modules(path, text):
                found = module_to_path(source, module)
                if found and found not in seen:
                    todo.append(found)


# tests/generation/test_utils.py is not in the transformers sdist and comes from the snapshot (upstream main of
# 2026-08-20), older than the installed release, which renamed the cache from `past_key_values` to `cache` (the old
# name survives only as a deprecated alias: a kwarg forward() renames with a warning and a property on outputs, but
# `"past_key_values" in outputs` is False). Unpatched, the mixin skips its cache-format and continue-from-cache tests
# for every model of the release ("This model doesn't return `past_key_values`").
DRIFT_PATCHES = {
    "tests/generation/test_utils.py": [
        # H1: the cache rename
        ('if "past_key_values" not in outputs:', 'if "cache" not in outputs:', 3),
        ('cache = outputs["past_key_values"]', 'cache = outputs["cache"]', 1),
        ('inputs["past_key_values"] = outputs_cached.past_key_values', 'inputs["cache"] = outputs_cached.cache', 1),
        # H2: not drift but an upstream slip at that commit: `is_flaky` is a decorator factory, so a bare `@is_flaky`
        # replaces the test by the inner decorator and the test "passes" without running anything.
        (
            "    @is_flaky\n    def test_prompt_lookup_decoding_matches_greedy_search",
            "    @is_flaky()\n    def test_prompt_lookup_decoding_matches_greedy_search",
            1,
        ),
    ],
}


def apply_drift_patches(root, log, patches=None):
    for path, edits in (DRIFT_PATCHES if patches is None else patches).items():
        full = os.path.join(root, path)
        with open(full) as f:
            text = f.read()
        for old, new, count in edits:
            found = text.count(old)
            if found != count:
                raise SystemExit(f"drift patch for {path} expected {count} x {old!r}, found {found}")
            text = text.replace(old, new)
            log.append(f"{path}\tdrift patch: {old!r} -> {new!r} (x{count})")
        with open(full, "w") as f:
            f.write(text)


TRANSFORMERS_ENTRIES = [
    "tests/test_modeling_common.py",
    "tests/test_configuration_common.py",
    "tests/generation/test_utils.py",
    # imported at run time by test_configuration_common (not through an import statement)
    "utils/test_module/__init__.py",
    "utils/test_module/custom_configuration.py",
]
DIFFUSERS_ENTRIES = [
    "tests/models/testing_utils/__init__.py",
    "tests/pipelines/test_pipelines_common.py",
    "tests/pipelines/pipeline_params.py",
]


def export_all(sources, out):
    """Export both upstreams under `out/transformers` and `out/diffusers`; writes `out/SOURCES.txt`, returns its lines.

    `sources` holds `tf_sdist`, `tf_git`, `tf_commit`, `df_git`, `df_commit`.
    """
    log = [f"# transformers: sdist {sources['tf_sdist']} first, then git {sources['tf_git']} @ {sources['tf_commit']}"]
    transformers = Source(sources["tf_sdist"], sources["tf_git"], sources["tf_commit"])
    export(transformers, TRANSFORMERS_ENTRIES, os.path.join(out, "transformers"), log)
    apply_drift_patches(os.path.join(out, "transformers"), log)
    log.append(f"# diffusers: git {sources['df_git']} @ {sources['df_commit']}")
    export(Source(None, sources["df_git"], sources["df_commit"]), DIFFUSERS_ENTRIES, os.path.join(out, "diffusers"), log)
    with open(os.path.join(out, "SOURCES.txt"), "w") as f:
        f.write("\n".join(log) + "\n")
    return log
