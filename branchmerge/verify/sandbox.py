"""Run untrusted Python programs (model-written code) contained, one child process tree per program.

    run_python(program, stdin="", limits=Limits(), isolation=None) -> SandboxResult
    configure(isolation="bwrap", workers=None)   # the process-wide default (evaluate.py, distill.py)

Shared by the toy code verifier, LiveCodeBench grading and distillation's code filter. Isolations:

- `bwrap` (default): bubblewrap puts the program in fresh user, mount, PID, network, IPC, UTS and
  cgroup namespaces: a read-only view of /usr and the interpreter, private size-capped tmpfs working
  directory and /tmp, its own /proc (only its own processes), no network but an isolated loopback,
  an empty environment, no capabilities, no further user namespaces (--disable-userns), no new
  privileges. Its PID namespace dies with its init, so the whole tree (daemonised grandchildren
  too) is killed at the wall limit. bwrap always runs unprivileged: a root caller first switches it
  to a uid of its own (UID_BASE + slot, no account, nothing on the host owned by it; through
  util-linux `setpriv`, so the caller is not forked), because
  RLIMIT_NPROC never binds uid 0 (fork bombs) and uid 0 owns the host's files. RLIMIT_NPROC then
  counts the processes of the program's own user namespace. The interpreter is this Python's base
  interpreter, or for a root caller whose interpreter an unprivileged uid cannot read (e.g. under
  /root) the distribution's python of the same version. Missing or broken bubblewrap raises
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

from branchmerge.errors import ConfigError, SandboxError

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

# argv: main.py cpu_s memory_mb file_size_mb max_open_files max_processes as_init (1: PID 1 of bwrap)
_RUNNER = r"""
import os, resource, sys
_src = open(sys.argv[1]).read()
_cpu, _mem, _fsz, _nof, _npr, _init = map(int, sys.argv[2:8])
if _init:  # the namespace's PID 1 waits; the program runs as its child, where signals act as usual
    _pid = os.fork()
    if _pid:
        _st = os.waitpid(_pid, 0)[1]
        os._exit(128 + os.WTERMSIG(_st) if os.WIFSIGNALED(_st) else os.WEXITSTATUS(_st))
for _r, _v in ((resource.RLIMIT_CPU, (_cpu, _cpu + 1)), (resource.RLIMIT_AS, (_mem << 20,) * 2),
               (resource.RLIMIT_FSIZE, (_fsz << 20,) * 2), (resource.RLIMIT_NOFILE, (_nof,) * 2),
               (resource.RLIMIT_NPROC, (_npr,) * 2), (resource.RLIMIT_CORE, (0, 0))):
    resource.setrlimit(_r, _v)
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


class SandboxUnavailableError(SandboxError):
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


def configure(isolation: str = "bwrap", workers: int | None = None, verify_now: bool = False) -> None:
    """Set the process-wide isolation and concurrency (from `sandbox:` in the eval/distill config);
    `verify_now`: prove bwrap works now (before hours of generation), not at the first program."""
    if isolation not in ISOLATIONS:
        raise ConfigError(f"sandbox.isolation={isolation!r} is not one of {ISOLATIONS}")
    if workers is not None and workers < 1:
        raise ConfigError(f"sandbox.workers={workers} must be >= 1 (or null for the CPU count)")
    if isolation == "process":
        log.warning(PROCESS_WARNING)
    _settings.update(isolation=isolation, workers=workers)
    if verify_now and isolation == "bwrap":
        check()


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
        "interpreter": _chosen.get(_key(path)) if path else sys.executable,
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
        bwrap, interp = check()
        with _uid_slot() as uid:
            return _run_bwrap(bwrap, interp, program, stdin, limits, wall, uid)
    if iso == "process":
        return _run_process(program, stdin, limits, wall)
    raise ConfigError(f"isolation={iso!r} is not one of {ISOLATIONS}")


def _runner_args(main: str, limits: Limits, as_init: bool) -> list[str]:
    nums = (limits.cpu_s, limits.memory_mb, limits.file_size_mb, limits.max_open_files, limits.max_processes)
    return ["-I", "-S", "-c", _RUNNER, main, *map(str, nums), str(int(as_init))]


# ---- process isolation (opt-in) ------------------------------------------------------------------


def _run_process(program: str, stdin: str, limits: Limits, wall: float) -> SandboxResult:
    with tempfile.TemporaryDirectory(prefix="bm-sandbox-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        (Path(tmp) / "main.py").write_text(program)
        argv = [sys.executable, *_runner_args(str(Path(tmp) / "main.py"), limits, False)]
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
_chosen: dict[tuple[str, bool], str] = {}  # (bwrap, caller is root) -> the interpreter that works


def _key(bwrap: str) -> tuple[str, bool]:
    return os.path.realpath(bwrap), os.geteuid() == 0


def check() -> tuple[str, str]:
    """(bwrap on PATH, interpreter), once proven to run a program; SandboxUnavailableError if not."""
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailableError(
            f"sandbox.isolation=bwrap needs bubblewrap (the `bwrap` program), which is not on PATH "
            f"({os.environ.get('PATH', '')}): install it with `{INSTALL}` (or `make setup` as root), "
            "or choose the weaker in-process guard explicitly with sandbox.isolation=process"
        )
    with _probe_lock:
        if _key(path) not in _chosen:
            _chosen[_key(path)] = _probe(path)
    return path, _chosen[_key(path)]


@lru_cache(maxsize=8)
def _bwrap_version(path: str) -> tuple[int, ...]:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, env=_ENV).stdout
    try:
        return tuple(int(x) for x in out.split()[-1].split("."))
    except (IndexError, ValueError):
        return (0,)


def _interpreters() -> list[str]:
    """This Python's base interpreter; for a root caller only those an unprivileged uid can run
    (every directory above world-searchable), with the distribution's of the same version next."""
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    if os.geteuid() != 0:
        return [base]
    v = f"{sys.version_info.major}.{sys.version_info.minor}"
    cands = [base] + [os.path.realpath(f"{d}/python{v}") for d in ("/usr/bin", "/usr/local/bin")]
    return [p for p in dict.fromkeys(cands) if os.path.exists(p) and _others_can_run(p)]


def _others_can_run(interp: str) -> bool:
    p = Path(interp)
    stdlib = p.parent.parent / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    dirs = [*p.parents, stdlib]
    return all(os.stat(d).st_mode & 0o005 == 0o005 for d in dirs if d.exists()) and bool(
        os.stat(p).st_mode & 0o001
    )


def _probe(path: str) -> str:
    version = _bwrap_version(path)
    if version < MIN_BWRAP:
        raise SandboxUnavailableError(
            f"bubblewrap at {path} is version {'.'.join(map(str, version))}; the sandbox needs >= "
            f"{'.'.join(map(str, MIN_BWRAP))} (--size, --disable-userns): `{INSTALL}` from a newer "
            "release (Debian 12, Ubuntu 24.04), or sandbox.isolation=process to opt out"
        )
    cands, detail = _interpreters(), "no interpreter an unprivileged uid can read"
    for interp in cands:
        with _uid_slot() as uid:
            r = _run_bwrap(path, interp, "print(6 * 7)", "", Limits(), 20.0, uid)
        if r.status == "ok" and r.stdout == "42\n":
            return interp
        detail = (r.stderr.strip().splitlines() or [r.reason])[-1]
    raise SandboxUnavailableError(
        f"bubblewrap at {path} could not start a sandbox with {cands or sys.executable} ({detail}). "
        "It needs unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1; on "
        "Ubuntu 24.04 also kernel.apparmor_restrict_unprivileged_userns=0; in a container, allow "
        "unshare/mount, e.g. docker --privileged) and, as root, a Python an unprivileged uid can "
        f"read (e.g. apt-get install python{sys.version_info.major}.{sys.version_info.minor}). "
        f"Install or repair bubblewrap with `{INSTALL}`, or opt out with sandbox.isolation=process"
    )


_slot_lock = threading.Lock()
_slots: set[int] = set()


@contextlib.contextmanager
def _uid_slot():
    """Root only: a uid of its own for this program (None otherwise): bwrap then runs unprivileged,
    and concurrent programs cannot signal or trace each other."""
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


@lru_cache(maxsize=4)
def _system_view(interp: str) -> tuple[str, ...]:
    """bwrap arguments for a read-only view of the system: /usr, its merged-/usr links, the
    interpreter's prefix, and the few /etc files the loader and `time` read."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = os.path.dirname(os.path.dirname(interp))
    if not any(prefix == t or prefix.startswith(t + "/") for t in ("/usr", "/bin", "/lib", "/lib64")):
        for parent in reversed(Path(prefix).parents[:-1]):  # bwrap would copy /root's 0700
            args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", prefix, prefix]
    for f in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime"):
        args += ["--ro-bind-try", f, f]
    return tuple(args)


def _bwrap_argv(bwrap: str, interp: str, limits: Limits, prog_fd: int, info_fd: int) -> list[str]:
    size = str(limits.disk_mb << 20)
    env = [a for k, v in _ENV.items() for a in ("--setenv", k, v)]
    return [
        bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL",
        "--die-with-parent", "--as-pid-1", "--new-session", "--hostname", "sandbox", *_system_view(interp),
        "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
        "--perms", "1777", "--size", size, "--tmpfs", "/tmp",
        "--perms", "1777", "--size", size, "--tmpfs", _WORK,
        "--perms", "0444", "--ro-bind-data", str(prog_fd), "/sandbox/main.py",
        "--remount-ro", "/", "--chdir", _WORK, "--clearenv", *env, "--info-fd", str(info_fd),
        "--", interp, *_runner_args("/sandbox/main.py", limits, True),
    ]  # fmt: skip


@lru_cache(maxsize=1)
def _setpriv() -> str | None:
    return shutil.which("setpriv", path=_ENV["PATH"])


def _as_user(argv: list[str], uid: int | None) -> tuple[list[str], dict]:
    """(argv, Popen keywords) that run `argv` as `uid` and its group, no supplementary groups (None:
    as the caller). Through util-linux `setpriv` when /usr/bin or /bin has it: Popen then starts
    the child with vfork; Popen's own user=/group= make it fork, which copies the page tables of a
    caller holding a model (~40 ms of CPU per program beside an 800 MB model, against ~0.3 ms)."""
    if uid is None:
        return argv, {}
    if _setpriv() is None:
        return argv, {"user": uid, "group": uid, "extra_groups": []}
    return [_setpriv(), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv], {}


def _run_bwrap(
    bwrap: str, interp: str, program: str, stdin: str, limits: Limits, wall: float, uid: int | None
) -> SandboxResult:
    prog_fd = os.memfd_create("main.py")
    info_r, info_w = os.pipe()
    try:
        _write_all(prog_fd, program.encode())
        os.lseek(prog_fd, 0, os.SEEK_SET)
        argv, ids = _as_user(_bwrap_argv(bwrap, interp, limits, prog_fd, info_w), uid)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.monotonic()
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=out, stderr=err, env=_ENV, cwd="/",
                pass_fds=(prog_fd, info_w), start_new_session=True, **ids,
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
    """SIGKILL the namespace's PID 1 and wait until it (hence everything in the namespace) has
    exited and bwrap has reaped it; killing bwrap is the fallback (--die-with-parent)."""
    if pidfd is not None:
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                select.select([pidfd], [], [], 10.0)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10.0)
        finally:
            os.close(pidfd)
    if proc.poll() is None:
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
