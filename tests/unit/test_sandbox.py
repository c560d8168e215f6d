"""The sandbox contains hostile programs and reports each outcome with its reason."""

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from branchmerge.verify import sandbox
from branchmerge.verify.sandbox import Limits, SandboxUnavailableError, run_python


def test_ok_program_and_stdin():
    r = run_python("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2 3")
    assert r.status == "ok" and r.stdout == "6\n" and r.returncode == 0


def test_error_reports_the_exception():
    r = run_python("raise ValueError('boom')")
    assert r.status == "error" and "ValueError: boom" in r.reason


def test_infinite_loop_times_out():
    r = run_python("while True:\n    pass", limits=Limits(cpu_s=1, wall_s=3))
    assert r.status == "timeout" and r.wall_s < 3.5


def test_sleeping_program_hits_the_wall_clock():
    r = run_python("import time\ntime.sleep(30)", timeout_s=1)
    assert r.status == "timeout" and "wall-clock" in r.reason and r.wall_s < 3


def test_fork_bomb_is_refused():
    r = run_python("import os\nwhile True:\n    os.fork()")
    assert r.status == "error" and "os.fork is not allowed" in r.reason


def test_subprocess_is_refused():
    r = run_python("import subprocess\nsubprocess.run(['echo', 'hi'])")
    assert r.status == "error" and "not allowed" in r.reason


def test_memory_bomb_is_contained():
    r = run_python("x = bytearray(4 * 1024 ** 3)\nprint('allocated')", limits=Limits(memory_mb=512))
    assert r.status in ("error", "killed") and "allocated" not in r.stdout


def test_writing_outside_the_working_directory_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    r = run_python(f"open({str(target)!r}, 'w').write('x')")
    assert r.status == "error" and "outside the working directory" in r.reason
    assert not target.exists()
    assert run_python("open('inside.txt', 'w').write('x')\nprint(open('inside.txt').read())").stdout == "x\n"


def test_network_is_refused():
    r = run_python("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))")
    assert r.status == "error" and "not allowed" in r.reason


def test_parent_environment_is_not_visible():
    os.environ["BM_SECRET_TOKEN"] = "hunter2"
    try:
        r = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('BM_SECRET_TOKEN'))")
    finally:
        del os.environ["BM_SECRET_TOKEN"]
    assert "hunter2" not in r.stdout and "None" in r.stdout


def test_output_flood_is_capped():
    r = run_python("while True:\n    print('x' * 1000)", limits=Limits(output_bytes=10_000, file_size_mb=1))
    assert r.status == "killed" and len(r.stdout) <= 10_000


# ---- isolation choice, fail-closed, provenance -----------------------------------------------------


@pytest.fixture
def restore_settings():
    saved = dict(sandbox._settings)
    yield
    sandbox._settings.update(saved)


def _fake_bwrap(tmp_path, version: str, fails: bool):
    """A `bwrap` stand-in in a world-searchable folder (a root caller runs bwrap as another uid)."""
    d = Path(tempfile.mkdtemp(prefix=f"bm-fake-bwrap-{version}-"))
    d.chmod(0o755)
    (tmp_path / "fake_dirs").open("a").write(f"{d}\n")
    body = f'[ "$1" = --version ] && {{ echo "bubblewrap {version}"; exit 0; }}\n'
    body += 'echo "bwrap: No permissions to create new namespace" >&2; exit 1\n' if fails else "exit 0\n"
    (d / "bwrap").write_text("#!/bin/sh\n" + body)
    (d / "bwrap").chmod(0o755)
    return d


def test_missing_bwrap_fails_closed_with_the_install_command(monkeypatch, tmp_path):
    """Bug guarded: silently falling back to the in-process guard when bubblewrap is missing."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailableError, match=r"bubblewrap.*not on PATH.*apt-get install bubblewrap"):
        run_python("print(1)")
    with pytest.raises(SandboxUnavailableError):
        run_python("print(1)", isolation="bwrap")
    assert issubclass(SandboxUnavailableError, RuntimeError)


def test_process_isolation_still_runs_when_chosen_explicitly(monkeypatch, tmp_path, caplog, restore_settings):
    """Bug guarded: the opt-in mode also requiring bwrap, or running without the logged warning."""
    monkeypatch.setenv("PATH", str(tmp_path))
    r = run_python("import sys\nprint(sys.stdin.read()[::-1])", stdin="abc", isolation="process")
    assert r.status == "ok" and r.stdout == "cba\n"
    with caplog.at_level(logging.WARNING, logger="branchmerge.verify.sandbox"):
        sandbox.configure("process")
    assert "sandbox.isolation=process" in caplog.text
    assert run_python("print(6 * 7)").stdout == "42\n"
    prov = sandbox.provenance()
    assert prov["isolation"] == "process" and "can disable" in prov["warning"] and prov["tool"] is None


def test_bwrap_that_cannot_make_namespaces_or_is_too_old_fails_closed(monkeypatch, tmp_path, request):
    """Bug guarded: a bwrap that starts but cannot sandbox (no user namespaces) counted as working,
    which would grade every program as failing instead of stopping."""
    request.addfinalizer(lambda: [shutil.rmtree(d) for d in (tmp_path / "fake_dirs").read_text().split()])
    monkeypatch.setenv("PATH", str(_fake_bwrap(tmp_path, "0.8.0", fails=True)))
    with pytest.raises(
        SandboxUnavailableError, match=r"could not start a sandbox.*No permissions.*user namespaces"
    ):
        run_python("print(1)")
    monkeypatch.setenv("PATH", str(_fake_bwrap(tmp_path, "0.6.1", fails=False)))
    with pytest.raises(SandboxUnavailableError, match=r"version 0\.6\.1.*needs >= 0\.8\.0"):
        run_python("print(1)")


def test_configure_rejects_unknown_isolation(restore_settings):
    with pytest.raises(ValueError, match="sandbox.isolation='docker'"):
        sandbox.configure("docker")


def test_bwrap_is_the_default_and_is_recorded(restore_settings):
    """Bug guarded: the default drifting to the weak mode, or provenance not naming the tool."""
    sandbox.configure()
    r = run_python("import os\nprint(os.getpid(), sorted(p for p in os.listdir('/proc') if p.isdigit()))")
    assert r.stdout == "2 ['1', '2']\n"  # its own PID namespace: the runner's PID 1 and the program
    prov = sandbox.provenance()
    assert prov["isolation"] == "bwrap" and prov["tool"].startswith("bubblewrap ") and prov["warning"] is None


def test_concurrent_grading_reports_the_first_failing_test_in_order():
    """Bug guarded: with tests run concurrently, reporting the first failure to *finish* (test 3,
    fast) instead of the first in order (test 1, slow), or cancelling a test before it."""
    from branchmerge.verify.graders import grade_code, grade_code_many

    fence = "```python\n{}\n```"
    prog = fence.format(
        "import time\nn = int(input())\nif n == 1:\n    time.sleep(0.4)\n    raise ValueError('one')\n"
        "print('bad' if n == 3 else 2 * n)"
    )
    good = fence.format("print(2 * int(input()))")
    tests = [{"input": str(n), "output": str(2 * n), "testtype": "stdin"} for n in range(4)]
    got = grade_code_many([prog, good, "no code", prog], tests, workers=4)
    want = {"passed": False, "reason": "test 1: error: ValueError: one"}
    assert got == [want, {"passed": True, "reason": ""}, {"passed": False, "reason": "no code block"}, want]
    assert grade_code(prog, tests) == want


@pytest.mark.skipif(os.geteuid() != 0 or sandbox._setpriv() is None, reason="root caller with setpriv")
def test_a_root_caller_hands_bwrap_its_uid_without_forking_itself(monkeypatch):
    """bwrap runs as the program's own uid and group with no supplementary groups, set by setpriv,
    so Popen gets no user=/group= and starts the child with vfork. Bug planted: Popen(user=uid,
    group=uid, extra_groups=[]) again -> a fork per program that copies the page tables of a caller
    holding a model (~40 ms of CPU each beside an 800 MB model; the toy code suite ran 3x slower)."""
    import subprocess

    calls = []
    popen = subprocess.Popen

    def spy(argv, **kw):
        calls.append((argv, kw))
        return popen(argv, **kw)

    monkeypatch.setattr(subprocess, "Popen", spy)
    assert run_python("print(6 * 7)").stdout == "42\n"
    argv, kw = calls[-1]
    assert not {"user", "group", "extra_groups"} & kw.keys()
    assert argv[0] == sandbox._setpriv() and int(argv[1].removeprefix("--reuid=")) >= sandbox.UID_BASE
    uid = sandbox.UID_BASE + 123
    argv, kw = sandbox._as_user(["/usr/bin/id"], uid)
    assert popen(argv, stdout=subprocess.PIPE, text=True, **kw).communicate()[0].split() == [
        f"uid={uid}",
        f"gid={uid}",
        f"groups={uid}",
    ]
