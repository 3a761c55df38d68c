"""What the client and ``sandpool run`` do with a result's files and results: no daemon."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
from sandpool_client import RunResult

from api.cli import report_outcome, upload_file
from api.client import save_files


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def entry(path: str, content: bytes | None, kind: str = "file", *, size: int | None = None,
          truncated: bool = False) -> dict[str, Any]:
    return {"path": path, "type": kind, "size": len(content or b"") if size is None else size,
            "content": None if content is None else b64(content), "truncated": truncated}


def test_save_files_writes_regular_files_at_their_paths_and_skips_the_rest(
    tmp_path: Path,
) -> None:
    result = {"files": [
        entry("out/a.csv", b"x,y\n"), entry("out/deep/er/b.bin", b"\0\xff"),
        entry("out/link", None, "symlink", size=9), entry("out/pipe", None, "fifo"),
    ]}
    assert save_files(result, tmp_path) == ["out/a.csv", "out/deep/er/b.bin"]
    assert (tmp_path / "out/a.csv").read_bytes() == b"x,y\n"
    assert (tmp_path / "out/deep/er/b.bin").read_bytes() == b"\0\xff"
    assert not (tmp_path / "out/link").exists()
    assert not (tmp_path / "out/pipe").exists()
    assert save_files({"files": []}, tmp_path / "none") == []


def test_save_files_overwrites_a_file_but_never_follows_a_link(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out/a").write_bytes(b"old content")
    save_files({"files": [entry("out/a", b"new")]}, tmp_path)
    assert (tmp_path / "out/a").read_bytes() == b"new"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    os.symlink(victim, tmp_path / "out/b")
    with pytest.raises(OSError, match="symbolic links"):  # ELOOP: O_NOFOLLOW
        save_files({"files": [entry("out/b", b"overwritten?")]}, tmp_path)
    assert victim.read_bytes() == b"keep"


@pytest.mark.parametrize("path", ["/etc/passwd", "out/../../x", "out//x", "out/./x", "out/\0"])
def test_save_files_refuses_a_path_the_daemon_never_sends(tmp_path: Path, path: str) -> None:
    with pytest.raises(ValueError, match="refusing to write the returned path"):
        save_files({"files": [entry(path, b"x")]}, tmp_path / "dir")
    assert not (tmp_path / "dir").exists()


def test_upload_file_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data.csv").write_bytes(b"a,b\n")
    (tmp_path / "k=v.txt").write_bytes(b"kv")
    monkeypatch.chdir(tmp_path)
    assert upload_file("data.csv") == ("data.csv", b"a,b\n")
    assert upload_file(f"{tmp_path}/data.csv") == ("data.csv", b"a,b\n")
    assert upload_file("data.csv=in/input.csv") == ("in/input.csv", b"a,b\n")
    # A path holding "=" that names a file is that file; NAME splits at the last "=".
    assert upload_file("k=v.txt") == ("k=v.txt", b"kv")
    assert upload_file("k=v.txt=kv") == ("kv", b"kv")
    with pytest.raises(FileNotFoundError):
        upload_file("missing.csv=x")


def run_result(**fields: Any) -> RunResult:
    """What ``sandpool run`` gets: the client's typed result of an answer with ``fields``."""
    return RunResult.from_json({
        "exit_code": 0, "stdout": "", "stderr": "", "timed_out": False, "oom_killed": False,
        "stdout_truncated": False, "stderr_truncated": False, "duration_ms": 1.0,
        "queued_ms": 0.0, "pool": "python", "sandbox_id": "s", "files": [], "files_omitted": 0,
        "results": [], "results_omitted": 0, "error": None, **fields,
    })


def test_report_outcome_saves_files_and_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = b"\x89PNG\r\n\x1a\n"
    result = run_result(
        files=[entry("out/r.txt", b"ok"), entry("out/cut.bin", b"12", size=10, truncated=True),
               entry("out/l", None, "symlink", size=3)],
        files_omitted=2,
        results=[{"type": "image/png", "data": b64(png), "truncated": False},
                 {"type": "text/plain", "data": "42", "truncated": False},
                 {"type": "image/png", "data": b64(png[:4]), "truncated": True}],
    )
    report_outcome(result, str(tmp_path))
    assert (tmp_path / "out/r.txt").read_bytes() == b"ok"
    assert (tmp_path / "out/cut.bin").read_bytes() == b"12"
    assert (tmp_path / "result-1.png").read_bytes() == png
    assert (tmp_path / "result-2.png").read_bytes() == png[:4]
    assert capsys.readouterr().err.splitlines() == [
        "sandpool: out/cut.bin was cut at the pool's file limit (2 of 10 bytes)",
        "sandpool: out/l is a symlink; only regular files come back",
        "sandpool: 2 more entries under out/ were left out (over the pool's max_files)",
        "sandpool: some results were cut or left out at the pool's max_results_bytes",
    ]


def test_report_outcome_without_out_dir_says_what_was_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    report_outcome(run_result(files=[entry("out/a", b"x")], results=[
        {"type": "image/png", "data": b64(b"p"), "truncated": False}]), None)
    assert capsys.readouterr().err == (
        "sandpool: the run returned 1 file(s) under out/ and 1 image(s); "
        "save them with --out-dir DIR\n"
    )
    assert list(tmp_path.iterdir()) == []
    report_outcome(run_result(results=[{"type": "text/plain", "data": "1",
                                        "truncated": False}]), None)
    report_outcome(run_result(), None)
    assert capsys.readouterr().err == ""


def test_report_outcome_makes_the_out_dir_for_images_alone(tmp_path: Path) -> None:
    report_outcome(run_result(results=[{"type": "image/png", "data": b64(b"p"),
                                        "truncated": False}]), str(tmp_path / "new"))
    assert (tmp_path / "new/result-1.png").read_bytes() == b"p"
