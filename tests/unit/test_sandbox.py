"""The sandbox contains hostile programs and reports each outcome with its reason."""

import os

from branchmerge.eval.sandbox import Limits, run_python


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
