"""Remove one protection at a time from a scratch copy of the tree; its test must fail.

    .venv/bin/python scripts/mutate.py [-k TEXT] [--ref REF] [--list] [--no-baseline] [--keep]

The table is ``scripts/mutations.toml``: each ``[[mutation]]`` names the
protection, the file, the exact ``original`` snippet, its ``replacement`` and
the pytest node id of the test that must catch it. For each row, on a copy of
the working tree (tracked and untracked files, not the ignored ones; the work
tree itself is never written), or of commit REF with ``--ref``, the snippet is
replaced, that single test runs with the repository's own ``.venv``, and the
snippet is put back.

Verdicts: ``caught`` (the test failed), ``NOT caught`` (it passed),
``ERROR`` (the snippet is missing or not unique, no test was collected, the
test timed out, or it already fails without the mutation: the baseline).
Exit status 0 only when every row is caught. Each test runs once without any
mutation first (``--no-baseline`` skips that), so a test that fails for an
unrelated reason is never counted as catching anything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
TABLE = REPOSITORY / "scripts" / "mutations.toml"
PYTEST = REPOSITORY / ".venv" / "bin" / "pytest"
PYTHON = REPOSITORY / ".venv" / "bin" / "python"
# Far above one row's cost (a test with its own daemon takes 10-40 s here); a
# row that reaches it is reported as an error, never as caught.
ROW_TIMEOUT_S = 240.0
# How long a daemon gets to stop on SIGTERM (the tests' own stop waits 60 s).
GROUP_GRACE_S = 60.0
# pytest's own exit statuses (pytest.ExitCode), spelled out so that this
# script does not import pytest.
TESTS_FAILED = 1
NO_TESTS_COLLECTED = 5


@dataclass(frozen=True, slots=True)
class Mutation:
    protection: str
    file: str
    original: str
    replacement: str
    test: str


@dataclass(slots=True)
class Outcome:
    verdict: str
    detail: str = ""
    seconds: float = 0.0


def load_table(path: Path) -> list[Mutation]:
    """The rows of the table; raises ValueError naming a row with missing or unknown keys."""
    rows = tomllib.loads(path.read_text())["mutation"]
    fields = set(Mutation.__dataclass_fields__)
    mutations = []
    for number, row in enumerate(rows, 1):
        if set(row) != fields:
            raise ValueError(f"{path.name} row {number}: keys {sorted(row)}, want {sorted(fields)}")
        mutations.append(Mutation(**row))
    return mutations


def copy_tree(source: Path, destination: Path) -> None:
    """The working tree as git sees it (uncommitted edits included, ignored files not)."""
    listed = subprocess.run(
        ["git", "-C", str(source), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True, timeout=60,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        relative = os.fsdecode(name)
        origin = source / relative
        if not origin.is_file() and not origin.is_symlink():
            continue  # deleted in the work tree, not yet committed
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(origin, target, follow_symlinks=False)


def export_commit(source: Path, ref: str, destination: Path) -> None:
    """The tree of commit ``ref``, as ``git archive`` writes it."""
    archive = subprocess.run(
        ["git", "-C", str(source), "archive", "--format=tar", ref],
        check=True, capture_output=True, timeout=60,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True, timeout=60)


def scratch_environment(scratch: Path) -> dict[str, str]:
    # The .venv holds an editable install of the work tree; its import hook comes
    # after sys.path, so the copy on PYTHONPATH (and pytest's rootdir) wins.
    return {**os.environ, "PYTHONPATH": str(scratch), "PYTHONDONTWRITEBYTECODE": "1"}


def check_imports_come_from(scratch: Path) -> None:
    """Raise RuntimeError unless pool, api and tests import from the copy."""
    found = subprocess.run(
        [str(PYTHON), "-c", "import api, pool, tests; print(pool.__file__, api.__file__, "
         "tests.__file__)"],
        cwd=scratch, env=scratch_environment(scratch), check=True, capture_output=True,
        text=True, timeout=60,
    ).stdout.split()
    strays = [path for path in found if not Path(path).is_relative_to(scratch)]
    if strays:
        raise RuntimeError(f"modules import from outside the scratch copy: {strays}")


def run_test(scratch: Path, node_id: str, timeout_s: float) -> Outcome:
    """Run one test by node id in the copy; whatever it leaves running is ended."""
    began = time.monotonic()
    # A session of its own, so that pytest and the daemons it starts form one
    # process group, apart from this script's: ending the group reaches a daemon
    # whose pytest is gone, and SIGTERM lets it remove its sandboxes first.
    process = subprocess.Popen(
        [str(PYTEST), node_id, "-x", "-q", "-p", "no:cacheprovider", "-rf"],
        cwd=scratch, env=scratch_environment(scratch), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        end_group(process)
        return Outcome("ERROR", f"timed out after {timeout_s:g} s", time.monotonic() - began)
    except BaseException:  # Ctrl-C or SIGTERM here: no daemon may outlive this script
        end_group(process)
        raise
    seconds = time.monotonic() - began
    if end_group(process):
        return Outcome("ERROR", "the test left processes running (ended)", seconds)
    if process.returncode == 0:
        return Outcome("NOT caught", "the test passed", seconds)
    if process.returncode == TESTS_FAILED:
        return Outcome("caught", failure_reason(output), seconds)
    if process.returncode == NO_TESTS_COLLECTED:
        return Outcome("ERROR", "no test collected: is the node id right?", seconds)
    return Outcome("ERROR", f"pytest exit {process.returncode}: {last_line(output)}", seconds)


def end_group(process: subprocess.Popen[str]) -> bool:
    """SIGTERM what is left of the process's group, SIGKILL what outlives a grace period.

    True if anything was left. A daemon killed with SIGKILL leaves its
    containers to the next daemon's reaper.
    """
    group = process.pid  # start_new_session: the group id is the leader's pid
    left = False
    for sig, grace_s in ((signal.SIGTERM, GROUP_GRACE_S), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + grace_s
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return left
        left = True
        while time.monotonic() < deadline:
            if process.poll() is None:  # the leader is reaped here, never a zombie
                time.sleep(0.1)
                continue
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return left
            time.sleep(0.1)
    return left


def failure_reason(output: str) -> str:
    """The first line of pytest's explanation (``E   AssertionError: ...``).

    From the FAILURES section when there is one: pytest prints errors in
    fixture teardown (the ERRORS section) before it.
    """
    lines = output.splitlines()
    failures = [i for i, line in enumerate(lines) if line.strip("= ") == "FAILURES"]
    for line in lines[failures[0] if failures else 0:]:
        if line.startswith("E "):
            return line[1:].strip()
    return last_line(output)


def last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def apply(scratch: Path, mutation: Mutation) -> str | None:
    """Put the replacement in; the original text to restore, or None if not there once."""
    path = scratch / mutation.file
    if not path.is_file():
        return None
    text = path.read_text()
    if text.count(mutation.original) != 1:
        return None
    path.write_text(text.replace(mutation.original, mutation.replacement))
    return text


def snippet_problem(scratch: Path, mutation: Mutation) -> str | None:
    path = scratch / mutation.file
    if not path.is_file():
        return f"{mutation.file} does not exist"
    count = path.read_text().count(mutation.original)
    if count == 0:
        return f"the original snippet is no longer in {mutation.file}"
    if count > 1:
        return f"the original snippet occurs {count} times in {mutation.file}"
    return None


def print_table(mutations: list[Mutation], outcomes: list[Outcome]) -> None:
    headers = ("protection", "test", "verdict", "s", "why")
    rows = [
        (m.protection, m.test.rpartition("::")[2], o.verdict, f"{o.seconds:.0f}", o.detail[:90])
        for m, o in zip(mutations, outcomes, strict=True)
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for line in (headers, tuple("-" * w for w in widths), *rows):
        print(" | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="select", default="",
                        help="only rows whose protection, file or test contains TEXT")
    parser.add_argument("--ref", help="copy this commit instead of the working tree")
    parser.add_argument("--list", action="store_true", help="print the rows and check snippets")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the run of each test without any mutation")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    parser.add_argument("--timeout-s", type=float, default=ROW_TIMEOUT_S)
    options = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the running test's daemons and the scratch
    # copy are cleaned up on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    mutations = [
        m for m in load_table(TABLE)
        if options.select in m.protection or options.select in m.file or options.select in m.test
    ]
    if not mutations:
        print(f"mutate: no row of {TABLE.name} matches {options.select!r}", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="sandpool-mutate-"))
    # Readable like a checkout: tests that drop to another uid import the copy too.
    scratch.chmod(0o755)
    try:
        if options.ref:
            export_commit(REPOSITORY, options.ref, scratch)
        else:
            copy_tree(REPOSITORY, scratch)
        check_imports_come_from(scratch)
        problems = [snippet_problem(scratch, m) for m in mutations]
        if options.list:
            for m, problem in zip(mutations, problems, strict=True):
                print(f"{'ERROR ' + problem if problem else 'ok'}: {m.protection} -> {m.test}")
            return 1 if any(problems) else 0
        baselines: dict[str, Outcome] = {}
        outcomes = []
        for m, problem in zip(mutations, problems, strict=True):
            if problem:
                outcomes.append(Outcome("ERROR", problem))
                continue
            if not options.no_baseline and m.test not in baselines:
                print(f"mutate: baseline {m.test}", flush=True)
                baselines[m.test] = run_test(scratch, m.test, options.timeout_s)
            baseline = baselines.get(m.test)
            if baseline is not None and baseline.verdict != "NOT caught":
                outcomes.append(Outcome("ERROR", f"fails without the mutation: {baseline.detail}"))
                continue
            print(f"mutate: {m.protection}", flush=True)
            original = apply(scratch, m)
            assert original is not None  # snippet_problem said it is there once
            try:
                outcomes.append(run_test(scratch, m.test, options.timeout_s))
            finally:
                (scratch / m.file).write_text(original)
        print_table(mutations, outcomes)
        survived = [o for o in outcomes if o.verdict != "caught"]
        print(f"mutate: {len(outcomes) - len(survived)} of {len(outcomes)} caught")
        return 1 if survived else 0
    finally:
        if options.keep:
            print(f"mutate: scratch copy kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
