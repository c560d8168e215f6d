"""Run untrusted Python programs (model-written code) contained, one child process tree per program.

    run_python(program, stdin="", limits=Limits(), isolation=None) -> SandboxResult
    configure(isolation="bwrap", workers=None)   # the process-wide default (evaluate.py, distill.py)

Shared by the toy code verifier, LiveCodeBench grading and distillation's code filter. Isolations:

- `bwrap` (default): bubblewrap puts the program in fresh mount, PID, network, IPC, UTS and cgroup
  namespaces: a read-only view of /usr and the interpreter, private size-capped tmpfs working
  directory and /tmp, its own /proc (only its own processes), no network device but loopback, an
  empty environment, no capabilities, no further user namespaces. Its own PID namespace dies with
  its init, so the whole tree (daemonised grandchildren too) is killed at the wall limit. Not root:
  bwrap runs unprivileged in a user namespace (RLIMIT_NPROC then counts per namespace). Root: bwrap
  runs privileged, keeps only CAP_SETUID/SETGID, and the runner switches to an unprivileged uid
  (UID_BASE + slot, one per concurrent program) before the program starts: RLIMIT_NPROC does not bind
  uid 0, and a root-owned file stays unreadable/unwritable. Missing or broken bubblewrap raises
  SandboxUnavailableError (fail closed).
- `process` (explicit opt-in only, logged as a warning): a plain child process with the same
  rlimits and an audit hook; no OS boundary, see PROCESS_WARNING.

In both, a runner sets the rlimits (CPU seconds, address space, file size, open files, processes, no
core) and installs a Python audit hook before the program starts. Under bwrap the hook is only a
first layer that fails common attempts fast with a readable reason ("os.fork is not allowed"); the
program can tamper with it, the namespaces and uid are the boundary. stdout / stderr go to files
capped by the file-size limit and are read back truncated.

Outcome: status "ok" | "error" | "timeout" | "killed" with the reason, the output and the return code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

ISOLATIONS = ("bwrap", "process")
INSTALL = "apt-get install bubblewrap"
MIN_BWRAP = (0, 8, 0)  # --size (tmpfs caps) and --disable-userns
UID_BASE = 1_900_000_000  # unprivileged uids for programs when the caller is root (no account)
PROCESS_WARNING = (
    "sandbox.isolation=process: generated programs run as ordinary child processes of this user "
    "behind an in-process audit hook that a program can disable; they can read this user's files, "
    "other processes' /proc and the network. Use only on a throwaway machine; the default "
    f"sandbox.isolation=bwrap isolates them ({INSTALL})."
)
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
_WORK = "/work"  # the program's working directory inside bwrap

# argv: main.py cpu_s memory_mb file_size_mb max_open_files max_processes uid (-1: keep)
_RUNNER = r"""
import os, resource, sys
_src = open(sys.argv[1]).read()
_cpu, _mem, _fsz, _nof, _npr, _uid = map(int, sys.argv[2:8])
for _r, _v in ((resource.RLIMIT_CPU, (_cpu, _cpu + 1)), (resource.RLIMIT_AS, (_mem << 20,) * 2),
               (resource.RLIMIT_FSIZE, (_fsz << 20,) * 2), (resource.RLIMIT_NOFILE, (_nof,) * 2),
               (resource.RLIMIT_NPROC, (_npr,) * 2), (resource.RLIMIT_CORE, (0, 0))):
    resource.setrlimit(_r, _v)
if _uid >= 0:
    os.setgroups([]); os.setgid(_uid); os.setuid(_uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        sys.exit("sandbox: could not leave uid 0")
_ROOT = os.path.realpath(os.getcwd())
_BLOCKED = ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo", "os.fork",
            "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system", "subprocess.Popen",
            "pty.spawn", "os.kill", "os.killpg", "ctypes.dlopen", "os.putenv")
def _hook(event, args):
    if event.startswith(_BLOCKED) or event == "socket.__new__" and args[1:2] and args[1] not in (1,):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and len(args) > 1 and isinstance(args[0], (str, bytes)):
        mode, flags = args[1], (args[2] if len(args) > 2 else 0)
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing:
            p = os.path.realpath(os.fsdecode(args[0]))
            if not (p == _ROOT or p.startswith(_ROOT + os.sep) or p == os.devnull):
                raise PermissionError(f"sandbox: writing outside the working directory ({p})")
sys.addaudithook(_hook)
del _hook, _r, _v
sys.argv = ["main.py"]
exec(compile(_src, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


class SandboxUnavailableError(RuntimeError):
    """The requested isolation cannot run here (bubblewrap missing, too old, or no namespaces)."""


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 5
    wall_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 8
    output_bytes: int = 1 << 20
    max_open_files: int = 64
    max_processes: int = 64
    disk_mb: int = 64  # bwrap: size of the tmpfs working directory, and again of /tmp


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "ok" | "error" | "timeout" | "killed"
    reason: str
    stdout: str
    stderr: str
    returncode: int | None
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


_settings: dict = {"isolation": "bwrap", "workers": None}


def configure(isolation: str = "bwrap", workers: int | None = None) -> None:
    """Set the process-wide isolation and concurrency (from `sandbox:` in the eval/distill config)."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"sandbox.isolation={isolation!r} is not one of {ISOLATIONS}")
    if workers is not None and workers < 1:
        raise ValueError(f"sandbox.workers={workers} must be >= 1 (or null for the CPU count)")
    if isolation == "process":
        log.warning(PROCESS_WARNING)
    _settings.update(isolation=isolation, workers=workers)


def isolation() -> str:
    return _settings["isolation"]


def workers() -> int:
    """Programs to run at once: `sandbox.workers`, else the CPUs this process may use."""
    return _settings["workers"] or len(os.sched_getaffinity(0))


def provenance() -> dict:
    """What results.json / manifest.json record about how generated code was run."""
    iso = isolation()
    path = shutil.which("bwrap") if iso == "bwrap" else None
    return {
        "isolation": iso,
        "tool": f"bubblewrap {'.'.join(map(str, _bwrap_version(path)))}" if path else None,
        "uid": "per-program unprivileged uid" if iso == "bwrap" and os.geteuid() == 0 else "caller's",
        "workers": workers(),
        "warning": PROCESS_WARNING if iso == "process" else None,
    }


def run_python(
    program: str,
    stdin: str = "",
    limits: Limits | None = None,
    timeout_s: float | None = None,
    isolation: str | None = None,
) -> SandboxResult:
    """Run `program` with `stdin` under `limits` (timeout_s overrides limits.wall_s), isolated by
    `isolation` (None: the configured default, "bwrap" unless chosen otherwise)."""
    limits = limits or Limits()
    wall = timeout_s if timeout_s is not None else limits.wall_s
    iso = isolation or _settings["isolation"]
    if iso == "bwrap":
        bwrap = check()
        with _uid_slot() as uid:
            return _run_bwrap(bwrap, program, stdin, limits, wall, uid)
    if iso == "process":
        return _run_process(program, stdin, limits, wall)
    raise ValueError(f"isolation={iso!r} is not one of {ISOLATIONS}")


def _runner_args(main: str, limits: Limits, uid: int | None) -> list[str]:
    nums = (limits.cpu_s, limits.memory_mb, limits.file_size_mb, limits.max_open_files)
    return ["-I", "-S", "-c", _RUNNER, main, *map(str, nums), str(limits.max_processes), str(uid or -1)]


# ---- process isolation (opt-in) ------------------------------------------------------------------


def _run_process(program: str, stdin: str, limits: Limits, wall: float) -> SandboxResult:
    with tempfile.TemporaryDirectory(prefix="bm-sandbox-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        (Path(tmp) / "main.py").write_text(program)
        argv = [sys.executable, *_runner_args(str(Path(tmp) / "main.py"), limits, None)]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.monotonic()
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work, env=_ENV,
                start_new_session=True,
            )  # fmt: skip
            try:
                timed_out = _communicate(proc, stdin, wall)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return _result(proc.returncode, timed_out, wall, out, err, limits, time.monotonic() - t0)


def _communicate(proc: subprocess.Popen, stdin: str, wall: float) -> bool:
    """Feed stdin and wait up to `wall` seconds; True if the wall-clock limit ran out."""
    try:
        proc.communicate(stdin.encode(), timeout=wall)
        return False
    except subprocess.TimeoutExpired:
        return True


# ---- bubblewrap isolation ------------------------------------------------------------------------

_probe_lock = threading.Lock()
_probed: set[tuple[str, bool]] = set()


def check() -> str:
    """The bwrap executable on PATH, once proven to start a sandbox; SandboxUnavailableError if not."""
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailableError(
            f"sandbox.isolation=bwrap needs bubblewrap (the `bwrap` program), which is not on PATH "
            f"({os.environ.get('PATH', '')}): install it with `{INSTALL}` (or `make setup` as root), "
            "or choose the weaker in-process guard explicitly with sandbox.isolation=process"
        )
    key = (os.path.realpath(path), os.geteuid() == 0)
    with _probe_lock:
        if key not in _probed:
            _probe(path)
            _probed.add(key)
    return path


@lru_cache(maxsize=8)
def _bwrap_version(path: str) -> tuple[int, ...]:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, env=_ENV).stdout
    try:
        return tuple(int(x) for x in out.split()[-1].split("."))
    except (IndexError, ValueError):
        return (0,)


def _probe(path: str) -> None:
    version = _bwrap_version(path)
    if version < MIN_BWRAP:
        raise SandboxUnavailableError(
            f"bubblewrap at {path} is version {'.'.join(map(str, version))}; the sandbox needs >= "
            f"{'.'.join(map(str, MIN_BWRAP))} (--size, --disable-userns): `{INSTALL}` from a newer "
            "release (Debian 12, Ubuntu 24.04), or sandbox.isolation=process to opt out"
        )
    with _uid_slot() as uid:
        r = _run_bwrap(path, "print(6 * 7)", "", Limits(), 20.0, uid)
    if r.status != "ok" or r.stdout != "42\n":
        detail = (r.stderr.strip().splitlines() or [r.reason])[-1]
        raise SandboxUnavailableError(
            f"bubblewrap at {path} could not start a sandbox ({detail}). It needs to create "
            "namespaces: run as root, or allow unprivileged user namespaces (sysctl "
            "kernel.unprivileged_userns_clone=1; on Ubuntu 24.04 also "
            "kernel.apparmor_restrict_unprivileged_userns=0); in a container, allow unshare/mount "
            f"(e.g. docker --privileged). Install or repair with `{INSTALL}`, or opt out with "
            "sandbox.isolation=process"
        )


_slot_lock = threading.Lock()
_slots: set[int] = set()


@contextlib.contextmanager
def _uid_slot():
    """Root only: a uid of its own for this program (None otherwise), so one program's process count
    (RLIMIT_NPROC counts per uid) never starves another running at the same time."""
    if os.geteuid() != 0:
        yield None
        return
    with _slot_lock:
        slot = next(i for i in range(len(_slots) + 1) if i not in _slots)
        _slots.add(slot)
    try:
        yield UID_BASE + (os.getpid() % 100_000) * 1024 + slot % 1024
    finally:
        with _slot_lock:
            _slots.discard(slot)


@lru_cache(maxsize=1)
def _system_view() -> tuple[str, ...]:
    """bwrap arguments for a read-only view of the system: /usr, its merged-/usr links, the
    interpreter's own prefix, and the few /etc files the loader and `time` read."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    interp = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    prefixes.add(os.path.dirname(os.path.dirname(interp)))
    made: set[str] = set()
    for p in sorted(prefixes):
        if any(p == t or p.startswith(t + "/") for t in ("/usr", "/bin", "/lib", "/lib64")):
            continue
        for parent in reversed(Path(p).parents[:-1]):  # bwrap would make them 0700, like /root
            if str(parent) not in made:
                made.add(str(parent))
                args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", p, p]
    for f in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime"):
        args += ["--ro-bind-try", f, f]
    return (*args, interp)


def _bwrap_argv(bwrap: str, limits: Limits, uid: int | None, prog_fd: int, info_fd: int) -> list[str]:
    *view, interp = _system_view()
    if uid is None:  # unprivileged: a user namespace of our own, no nested ones, no capabilities
        ns = ["--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
    else:  # root: no user namespace (uid 0 would map to root); the runner drops to `uid`
        ns = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        ns += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    size = str(limits.disk_mb << 20)
    env = [a for k, v in _ENV.items() for a in ("--setenv", k, v)]
    return [
        bwrap, *ns, "--die-with-parent", "--new-session", "--hostname", "sandbox", *view,
        "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
        "--perms", "1777", "--size", size, "--tmpfs", "/tmp",
        "--perms", "1777", "--size", size, "--tmpfs", _WORK,
        "--perms", "0444", "--ro-bind-data", str(prog_fd), "/sandbox/main.py",
        "--remount-ro", "/", "--chdir", _WORK, "--clearenv", *env, "--info-fd", str(info_fd),
        "--", interp, *_runner_args("/sandbox/main.py", limits, uid),
    ]  # fmt: skip


def _run_bwrap(
    bwrap: str, program: str, stdin: str, limits: Limits, wall: float, uid: int | None
) -> SandboxResult:
    prog_fd = os.memfd_create("main.py")
    info_r, info_w = os.pipe()
    try:
        _write_all(prog_fd, program.encode())
        os.lseek(prog_fd, 0, os.SEEK_SET)
        argv = _bwrap_argv(bwrap, limits, uid, prog_fd, info_w)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.monotonic()
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=out, stderr=err, env=_ENV, cwd="/",
                pass_fds=(prog_fd, info_w), start_new_session=True,
            )  # fmt: skip
            os.close(info_w)
            info_w = -1
            pidfd = _sandbox_init(info_r, t0 + wall)
            try:
                timed_out = _communicate(proc, stdin, wall)
            finally:
                _kill_tree(proc, pidfd)
            rc = proc.returncode
            rc = -(rc - 128) if rc is not None and 128 < rc < 128 + signal.NSIG else rc
            return _result(rc, timed_out, wall, out, err, limits, time.monotonic() - t0)
    finally:
        for fd in (prog_fd, info_r, info_w):
            if fd >= 0:
                os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _sandbox_init(info_fd: int, deadline: float) -> int | None:
    """A pidfd of the sandbox's PID-namespace init, from bwrap's --info-fd JSON (None if it is gone
    or bwrap failed first). Killing it kills every process in the namespace."""
    buf = b""
    while b"}" not in buf and (left := deadline - time.monotonic()) > 0:
        if not select.select([info_fd], [], [], left)[0]:
            break
        chunk = os.read(info_fd, 4096)
        if not chunk:
            break
        buf += chunk
    try:
        return os.pidfd_open(int(json.loads(buf)["child-pid"]))
    except (ValueError, KeyError, TypeError, ProcessLookupError):
        return None


def _kill_tree(proc: subprocess.Popen, pidfd: int | None) -> None:
    """SIGKILL the namespace init and wait until it (hence everything in the namespace) has exited;
    then reap bwrap itself (which exits with its init; --die-with-parent covers the fallback)."""
    if pidfd is not None:
        try:
            if proc.poll() is None:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                select.select([pidfd], [], [], 10.0)
        finally:
            os.close(pidfd)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ---- outcome -------------------------------------------------------------------------------------


def _read_capped(f, cap: int) -> tuple[str, bool]:
    f.seek(0)
    data = f.read(cap + 1)
    return data[:cap].decode("utf-8", errors="replace"), len(data) > cap


def _result(
    rc: int | None, timed_out: bool, wall: float, out, err, limits: Limits, elapsed: float
) -> SandboxResult:
    stdout, cut = _read_capped(out, limits.output_bytes)
    stderr, _ = _read_capped(err, 64 << 10)
    if timed_out:
        return SandboxResult(
            "timeout", f"wall-clock limit of {wall:g}s exceeded", stdout, stderr, rc, elapsed
        )
    if rc is not None and rc < 0:
        sig = signal.Signals(-rc).name
        why = {
            "SIGXCPU": "CPU-time limit exceeded",
            "SIGXFSZ": "output or file-size limit exceeded",
            "SIGKILL": "killed (memory or process limit)",
        }.get(sig, f"terminated by {sig}")
        status = "timeout" if sig == "SIGXCPU" else "killed"
        return SandboxResult(status, why, stdout, stderr, rc, elapsed)
    if cut:
        return SandboxResult(
            "killed", f"output exceeded {limits.output_bytes} bytes", stdout, stderr, rc, elapsed
        )
    if rc != 0:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {rc}"
        return SandboxResult("error", last, stdout, stderr, rc, elapsed)
    return SandboxResult("ok", "", stdout, stderr, rc, elapsed)
