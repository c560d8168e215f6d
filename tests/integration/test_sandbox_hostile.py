"""Hostile programs through the public sandbox API (bubblewrap isolation) leave the host untouched.

Every program first disables the in-process audit hook (it rewrites the guard's globals from inside),
so what is tested is the operating-system boundary. After each run the `host` fixture checks: the
planted tree outside the working directory is byte-for-byte intact (same inode, size, mtime, hash)
and nothing new appeared there or at the usual escape targets; no sandbox process is left on the
host; no connection or datagram reached the loopback listeners (TCP, UDP, Unix path, Unix
abstract); the secret planted in this process's environment and in another process's environment is
not in the output; this process and the victim process are alive.

    pytest -q tests/integration/test_sandbox_hostile.py
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from branchmerge.verify import sandbox
from branchmerge.verify.sandbox import UID_BASE, Limits, run_python

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="bubblewrap is Linux-only")

FAST = Limits(cpu_s=2, wall_s=4.0, memory_mb=512, max_processes=32)
MARK = "31337"  # exec'd helpers carry it in their command line: `sleep 31337`
TAMPER = """
import sys
_g = sys.modules["__main__"].__dict__
_g["_BLOCKED"] = ()   # the audit hook now allows fork, exec, kill, ctypes, connect ...
_g["_ROOT"] = ""      # ... and writing anywhere
def tried(what, fn):
    try:
        print(what, "->", fn(), flush=True)
    except BaseException as e:
        print(what, "-> refused:", type(e).__name__, e, flush=True)
"""
NET = """
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
def _in(port):
    return struct.pack("<H", 2) + struct.pack(">H", port) + bytes([127, 0, 0, 1]) + bytes(8)
def tcp(port):
    fd = libc.socket(2, 1, 0)
    return fd, libc.connect(fd, _in(port), 16), ctypes.get_errno()
def udp(port):
    fd = libc.socket(2, 2, 0)
    return fd, libc.sendto(fd, b"leak", 4, 0, _in(port), 16), ctypes.get_errno()
"""


def _tree(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        out[str(p.relative_to(root))] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, digest)
    return out


def _sandbox_processes() -> list[str]:
    """Host processes that belong to a sandbox: a sandbox uid (root mode), or a command line with
    the runner's or a helper's mark."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if uid >= UID_BASE or f"sleep {MARK}" in cmd or "could not leave uid 0" in cmd:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
            found.append(f"{pid} uid={uid} state/ppid={state} {cmd[:80]}")
    return found


class Host:
    """The things a hostile program must not reach, and the check that it did not."""

    def __init__(self, tmp: Path) -> None:
        self.secret = "bm-secret-" + secrets.token_hex(16)
        self.token = secrets.token_hex(6)
        self.outside = tmp / "outside"
        (self.outside / "sub").mkdir(parents=True)
        self.planted = self.outside / "planted.txt"
        self.planted.write_text("precious checkpoint bytes\n" * 100)
        (self.outside / "sub" / "keys.env").write_text(f"API_KEY={self.secret}\n")
        self.escape_targets = [
            Path("/tmp") / f"bm-pwned-{self.token}",
            Path.cwd() / f"bm-pwned-{self.token}",
            Path.home() / f"bm-pwned-{self.token}",
            Path(sandbox.__file__).with_name(f"bm-pwned-{self.token}"),
        ]
        self.guard_file = Path(sandbox.__file__)
        self.guard_hash = hashlib.sha256(self.guard_file.read_bytes()).hexdigest()
        self.victim = subprocess.Popen(
            ["sleep", "600"], env={"BM_SECRET": self.secret, "PATH": "/usr/bin:/bin"}
        )
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.unix_path = str(tmp / "host.sock")
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(self.unix_path)
        self.unix.listen()
        self.abstract_name = f"\0bm-hostile-{self.token}"
        self.abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.abstract.bind(self.abstract_name)
        self.abstract.listen()
        for s in (self.tcp, self.udp, self.unix, self.abstract):
            s.setblocking(False)
        self.before = _tree(self.outside)

    def fill(self, template: str) -> str:
        """The program: TAMPER, then `template` with {planted}, {outside}, {victim}, ... filled in."""
        keys = {
            "planted": str(self.planted),
            "outside": str(self.outside),
            "victim": self.victim.pid,
            "caller": os.getpid(),
            "tcp": self.tcp.getsockname()[1],
            "udp": self.udp.getsockname()[1],
            "unix": self.unix_path,
            "abstract": self.abstract_name[1:],
            "targets": [str(t) for t in self.escape_targets],
            "guard": str(self.guard_file),
            "mark": MARK,
        }
        return TAMPER + template.format(**keys)

    def run(self, template: str, limits: Limits = FAST, stdin: str = "") -> sandbox.SandboxResult:
        os.environ["BM_HOSTILE_SECRET"] = self.secret
        try:
            r = run_python(self.fill(template), stdin=stdin, limits=limits, isolation="bwrap")
        finally:
            del os.environ["BM_HOSTILE_SECRET"]
        self.check(r)
        return r

    def check(self, r: sandbox.SandboxResult) -> None:
        assert _sandbox_processes() == [], "a sandbox process outlived the call"
        assert _tree(self.outside) == self.before, "the planted tree outside was changed"
        assert [t for t in self.escape_targets if t.exists()] == []
        assert hashlib.sha256(self.guard_file.read_bytes()).hexdigest() == self.guard_hash
        for s in (self.tcp, self.unix, self.abstract):
            with pytest.raises(BlockingIOError):
                s.accept()
        with pytest.raises(BlockingIOError):
            self.udp.recvfrom(64)
        assert self.secret not in r.stdout + r.stderr + r.reason
        assert self.victim.poll() is None, "the victim process was killed"

    def close(self) -> None:
        self.victim.kill()
        self.victim.wait()
        for s in (self.tcp, self.udp, self.unix, self.abstract):
            s.close()


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    sandbox.check()  # fail loudly here, not as 20 odd failures, when bubblewrap cannot run
    h = Host(tmp_path_factory.mktemp("hostile"))
    yield h
    h.close()


def test_tampering_with_the_guard_then_writing_outside(host):
    """Bug guarded: isolation by the audit hook alone (its globals rewritten, then anything goes)."""
    r = host.run(
        "import os\n"
        "tried('overwrite', lambda: open({planted!r}, 'w').write('gone'))\n"
        "tried('append', lambda: open({planted!r}, 'a').write('gone'))\n"
        "tried('new file', lambda: open({outside!r} + '/new.txt', 'w').write('x'))\n"
        "for t in {targets!r}:\n"
        "    tried('escape ' + t, lambda: open(t, 'w').write('pwned'))\n"
        "tried('inside', lambda: open('ok.txt', 'w').write('fine'))\n"
    )
    assert "inside -> 4" in r.stdout  # the tampered guard let the program write: the OS refused
    assert "overwrite -> refused: FileNotFoundError" in r.stdout


def test_renaming_outside(host):
    """Bug guarded: the host's tree mounted into the sandbox (rename needs no `open` event)."""
    r = host.run(
        "import os\n"
        "tried('rename', lambda: os.rename({planted!r}, {planted!r} + '.moved'))\n"
        "tried('replace dir', lambda: os.replace({outside!r} + '/sub', '/work/stolen'))\n"
    )
    assert "rename -> refused" in r.stdout and "replace dir -> refused" in r.stdout


def test_truncating_outside(host):
    """Bug guarded: a writable bind of the caller's files (truncate needs no write-mode open)."""
    r = host.run(
        "import os\n"
        "tried('truncate', lambda: os.truncate({planted!r}, 0))\n"
        "tried('r+', lambda: open({planted!r}, 'r+').truncate(0))\n"
    )
    assert r.stdout.count("refused") == 2


def test_deleting_outside(host):
    """Bug guarded: the host tree visible read-write: unlink/rmtree raise no `open` audit event."""
    r = host.run(
        "import os, shutil\n"
        "tried('unlink', lambda: os.unlink({planted!r}))\n"
        "tried('rmtree', lambda: shutil.rmtree({outside!r}))\n"
        "tried('rmdir via /proc', lambda: shutil.rmtree('/proc/1/root' + {outside!r}))\n"
    )
    assert r.stdout.count("refused") == 3


def test_the_system_is_read_only(host):
    """Bug guarded: a writable /usr or root (a program could plant code other runs import)."""
    r = host.run(
        "import os\n"
        "for p in ['/usr/lib/pwned', '/etc/pwned', '/pwned', '/dev/pwned', '/dev/shm/pwned',\n"
        "          '/sandbox/main.py', os.__file__]:\n"
        "    tried(p, lambda: open(p, 'a').write('x'))\n"
        "tried('remount', lambda: __import__('subprocess').run(['mount', '-o', 'remount,rw', '/'],"
        " capture_output=True, text=True).stderr)\n"
    )
    assert r.stdout.count("-> refused") == 7, r.stdout


def test_the_guards_own_state_cannot_be_loosened(host):
    """Bug guarded: rlimits set soft only, or a program still root (it could raise its limits, take
    uid 0 back, or edit the host's sandbox code)."""
    r = host.run(
        "import os, resource, ctypes\n"
        "for name in ['RLIMIT_AS', 'RLIMIT_NPROC', 'RLIMIT_CPU', 'RLIMIT_FSIZE']:\n"
        "    lim = getattr(resource, name)\n"
        "    tried(name, lambda: resource.setrlimit(lim, (resource.RLIM_INFINITY,) * 2))\n"
        "tried('setuid 0', lambda: os.setuid(0))\n"
        "tried('libc setuid 0', lambda: (ctypes.CDLL(None).setuid(0), os.getuid()))\n"
        "tried('edit guard', lambda: open({guard!r}, 'a').write('# pwned'))\n"
        "print('uid', os.getuid())\n"
    )
    assert r.stdout.count("-> refused") == 6, r.stdout
    assert "uid 0\n" not in r.stdout


def test_other_processes_proc_entries_are_invisible(host):
    """Bug guarded: the host /proc (or PID namespace) shared: the victim's environment and this
    process's memory would be readable."""
    r = host.run(
        "import os\n"
        "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "print('pids', pids)\n"
        "for p in pids + [str({victim}), str({caller})]:\n"
        "    for f in ['environ', 'cmdline', 'maps']:\n"
        "        tried(p + '/' + f, lambda: open(f'/proc/{{p}}/{{f}}', 'rb').read()[-3000:])\n"
        "tried('caller mem', lambda: open('/proc/{caller}/mem', 'rb').read(64))\n"
        "print(open('/proc/self/environ', 'rb').read())\n"
    )
    pids = eval(r.stdout.split("pids ")[1].splitlines()[0])
    assert set(pids) <= {"1", "2", "3"}  # bwrap's init, the program (and its `tried` children: none)
    assert f"/proc/{host.victim.pid}" not in r.stdout or f"{host.victim.pid}/environ -> refused" in r.stdout


def test_secrets_in_files_and_environment_are_out_of_reach(host):
    """Bug guarded: the caller's environment inherited (env=None) or the home/work tree mounted."""
    r = host.run(
        "import os\n"
        "print(dict(os.environ))\n"
        "tried('keys', lambda: open({outside!r} + '/sub/keys.env').read())\n"
        "tried('home', lambda: os.listdir(os.path.expanduser('~')))\n"
        "tried('root', lambda: os.listdir('/root'))\n"
        "tried('etc', lambda: os.listdir('/etc'))\n"
    )
    env = eval(r.stdout.splitlines()[0])
    assert "BM_HOSTILE_SECRET" not in env and set(env) <= {
        "PATH",
        "LANG",
        "PYTHONHASHSEED",
        "PYTHONDONTWRITEBYTECODE",
        "PWD",
    }
    assert "keys -> refused: FileNotFoundError" in r.stdout


def test_fork_bomb(host):
    """Bug guarded: no process limit for a root caller (RLIMIT_NPROC does not bind uid 0): the bomb
    would fill the host's PID table. The counted bomb shows the bound, the exponential one the kill."""
    counted = host.run(
        "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
        "            time.sleep(60)\n        n += 1\nexcept OSError as e:\n    print('forks', n, e.strerror)\n",
        limits=Limits(cpu_s=2, wall_s=4.0, max_processes=16),
    )
    assert counted.status == "ok" and int(counted.stdout.split()[1]) < 16, counted.stdout
    t0 = time.monotonic()
    r = host.run(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        limits=Limits(cpu_s=2, wall_s=2.0, max_processes=16),
    )
    assert r.status in ("timeout", "killed") and time.monotonic() - t0 < 8


def test_fork_bomb_does_not_starve_concurrent_programs(host):
    """Bug guarded: every program under one uid (RLIMIT_NPROC is per uid): a bomb next door makes
    an honest threaded program fail."""
    bomb = host.fill(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    honest = (
        "import threading\nout = []\nts = [threading.Thread(target=out.append, args=(i,)) for i in range(8)]\n"
        "[t.start() for t in ts]\n[t.join() for t in ts]\nprint(sum(out))\n"
    )
    lim = Limits(cpu_s=3, wall_s=3.0, max_processes=16)
    with ThreadPoolExecutor(3) as pool:
        fb = pool.submit(run_python, bomb, "", lim, None, "bwrap")
        time.sleep(0.5)
        honest_runs = [pool.submit(run_python, honest, "", lim, None, "bwrap") for _ in range(4)]
        results = [f.result() for f in honest_runs]
        fb.result()
    assert [(x.status, x.stdout) for x in results] == [("ok", "28\n")] * 4
    host.check(results[0])


def test_thread_bomb(host):
    """Bug guarded: threads unbounded (they count against RLIMIT_NPROC like processes)."""
    r = host.run(
        "import threading, time\nn = 0\ntry:\n    while True:\n"
        "        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n        n += 1\n"
        "except Exception as e:\n    print('stopped at', n, type(e).__name__)\n",
        limits=Limits(cpu_s=2, wall_s=3.0, max_processes=16),
    )
    assert r.status == "ok" and int(r.stdout.split()[2]) < 16


def test_double_fork_daemon_dies_with_the_call(host):
    """Bug guarded: killing only the process group: a setsid() grandchild would outlive the call."""
    r = host.run(
        "import os\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.execv('/bin/sleep', ['sleep', '{mark}'])\n"
        "    os._exit(0)\n"
        "os.wait()\nprint('parent leaves')\n"
    )
    assert r.status == "ok" and "parent leaves" in r.stdout


def test_daemon_still_running_at_the_wall_limit(host):
    """Bug guarded: waiting for the namespace init's exit skipped on timeout (a race: the call
    returns while the PID namespace is still being torn down)."""
    r = host.run(
        "import os, time\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        os.execv('/bin/sleep', ['sleep', '{mark}'])\n"
        "time.sleep(60)\n",
        limits=Limits(cpu_s=2, wall_s=1.0),
    )
    assert r.status == "timeout"


def test_signals_to_the_parent_and_others(host):
    """Bug guarded: a shared PID namespace or the caller's uid: kill(-1) or kill(caller) would land."""
    r = host.run(
        "import os, signal\n"
        "for pid in [os.getppid(), 1, {caller}, {victim}, -1, 0]:\n"
        "    tried(f'kill {{pid}}', lambda: os.kill(pid, signal.SIGKILL) if pid > 0 else None)\n"
        "tried('killpg', lambda: os.killpg({caller}, signal.SIGKILL))\n"
        "os.kill(-1, signal.SIGKILL)\n"
    )
    assert r.status in ("killed", "ok", "error")  # it may kill itself; the caller lives on


def test_memory_exhaustion(host):
    """Bug guarded: RLIMIT_AS missing: the allocation would grow to the host's memory."""
    r = host.run(
        "blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))\n",
        limits=Limits(cpu_s=4, wall_s=6.0, memory_mb=256),
    )
    assert r.status == "error" and "MemoryError" in r.reason


def test_cpu_exhaustion(host):
    """Bug guarded: no CPU limit: the loop runs to the wall limit on a busy core."""
    r = host.run("while True:\n    pass\n", limits=Limits(cpu_s=1, wall_s=5.0))
    assert r.status == "timeout" and r.reason == "CPU-time limit exceeded" and r.wall_s < 3


def test_disk_exhaustion_stays_in_a_capped_tmpfs(host):
    """Bug guarded: the working directory or /tmp on the host disk, or a tmpfs without --size."""
    r = host.run(
        "import os\ntotal = 0\n"
        "for d in ['/work', '/tmp']:\n"
        "    for i in range(1000):\n"
        "        try:\n"
        "            with open(f'{{d}}/f{{i}}', 'wb') as f:\n"
        "                f.write(bytes(1 << 20))\n"
        "            total += 1\n"
        "        except OSError as e:\n"
        "            print(d, 'full:', e.strerror)\n"
        "            break\n"
        "print('MiB', total)\n",
        limits=Limits(cpu_s=4, wall_s=8.0, disk_mb=8),
    )
    assert "/work full: No space left on device" in r.stdout
    assert "/tmp full: No space left on device" in r.stdout
    assert int(r.stdout.split("MiB")[1]) <= 16


def test_output_exhaustion(host):
    """Bug guarded: output read without a cap (a flood would fill the caller's memory)."""
    r = host.run(
        "import sys\nwhile True:\n    sys.stdout.write('y' * 4096)\n    sys.stderr.write('z' * 4096)\n",
        limits=Limits(cpu_s=2, wall_s=4.0, file_size_mb=1, output_bytes=50_000),
    )
    assert r.status == "killed" and len(r.stdout) <= 50_000 and len(r.stderr) <= 64 << 10


def test_tcp_to_a_loopback_listener(host):
    """Bug guarded: the host network namespace shared (--share-net): connect() reaches 127.0.0.1."""
    r = host.run(
        NET + "tried('tcp', lambda: tcp({tcp}))\ntried('python tcp', lambda: "
        "__import__('socket').create_connection(('127.0.0.1', {tcp}), timeout=1))\n"
    )
    assert "tcp -> (" in r.stdout and "python tcp -> refused" in r.stdout
    assert ", 0, " not in r.stdout.split("tcp -> ")[1].split("\n")[0]  # connect() returned -1


def test_udp_to_a_loopback_listener(host):
    """Bug guarded: the host network shared: a datagram reaches the listener."""
    r = host.run(NET + "tried('udp', lambda: udp({udp}))\n")
    assert "udp -> (" in r.stdout


def test_unix_sockets_path_and_abstract(host):
    """Bug guarded: /tmp or the caller's tree mounted (a path socket), or the network namespace
    shared (abstract sockets live in it)."""
    r = host.run(
        "import socket\n"
        "def conn(addr):\n"
        "    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "    s.connect(addr)\n"
        "    return 'connected'\n"
        "tried('path', lambda: conn({unix!r}))\n"
        "tried('abstract', lambda: conn('\\0' + {abstract!r}))\n"
    )
    assert "path -> refused" in r.stdout and "abstract -> refused" in r.stdout


def test_raw_and_packet_sockets(host):
    """Bug guarded: capabilities kept (as root bwrap keeps all unless dropped): CAP_NET_RAW."""
    r = host.run(
        NET + "tried('raw', lambda: (libc.socket(2, 3, 17), ctypes.get_errno()))\n"
        "tried('packet', lambda: (libc.socket(17, 3, 768), ctypes.get_errno()))\n"
        "import socket\n"
        "tried('py raw', lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP))\n"
    )
    assert "raw -> (-1, 1)" in r.stdout and "packet -> (-1, 1)" in r.stdout  # EPERM
    assert "py raw -> refused: PermissionError" in r.stdout


def test_native_code_escapes(host):
    """Bug guarded: capabilities or user namespaces left to the program: unshare/mount/chroot from
    native code would give it a writable view of the host."""
    r = host.run(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "def call(name, *args):\n    return getattr(libc, name)(*args), ctypes.get_errno()\n"
        "tried('unshare user', lambda: call('unshare', 0x10000000))\n"
        "tried('unshare mount', lambda: call('unshare', 0x00020000))\n"
        "tried('mount', lambda: call('mount', b'none', b'/usr', b'tmpfs', 0, None))\n"
        "tried('chroot', lambda: call('chroot', b'/tmp'))\n"
        "tried('ptrace', lambda: call('ptrace', 16, {caller}, None, None))\n"
        "ctypes.string_at(0)\n"
    )
    for what in ("unshare user", "unshare mount", "mount", "chroot", "ptrace"):
        line = next(x for x in r.stdout.splitlines() if x.startswith(what + " ->"))
        assert line.startswith(f"{what} -> (-1,"), line
    assert r.status == "killed" and "SIGSEGV" in r.reason


def test_sigterm_ignoring_loop(host):
    """Bug guarded: a polite SIGTERM on timeout instead of SIGKILL to the namespace."""
    t0 = time.monotonic()
    r = host.run(
        "import signal, os, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "if os.fork() == 0:\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "    while True:\n        pass\n"
        "while True:\n    time.sleep(0.01)\n",
        limits=Limits(cpu_s=30, wall_s=1.5),
    )
    assert r.status == "timeout" and time.monotonic() - t0 < 5


def test_setuid_binaries_grant_nothing(host):
    """Bug guarded: no-new-privileges off / capabilities kept: a setuid helper would run as root."""
    r = host.run(
        "import subprocess, os\n"
        "print('status', open('/proc/self/status').read())\n"
        "for cmd in [['su', '-c', 'id'], ['mount', '-t', 'tmpfs', 'x', '/usr'], ['unshare', '-r', 'id']]:\n"
        "    tried(cmd[0], lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=2).returncode)\n"
    )
    status = r.stdout.split("status ")[1]
    assert "NoNewPrivs:\t1" in status and "CapEff:\t0000000000000000" in status
    assert "Uid:\t0\t" not in status
    for name in ("su", "mount", "unshare"):
        line = next(x for x in r.stdout.splitlines() if x.startswith(name + " ->"))
        assert not line.endswith("-> 0"), line
