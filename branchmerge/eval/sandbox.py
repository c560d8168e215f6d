"""Run untrusted Python programs in a contained child process.

Shared by the toy code verifier, the LiveCodeBench grader and the distillation code filter.
Each program runs in its own process session with:
- resource limits (setrlimit): CPU seconds, address space, file size, open files, processes;
- a wall-clock limit, after which the whole process group is killed;
- an empty temporary working directory and a minimal environment (no parent secrets);
- a Python audit hook installed before the program starts that refuses network sockets,
  subprocesses / fork / exec, and opening files for writing outside the working directory
  (audit hooks cannot be removed from inside Python; RLIMIT_NPROC does not bind root);
- stdout / stderr written to files capped by the file-size limit, read back truncated.

Outcome: status "ok" | "error" | "timeout" | "killed" with the reason, the output and the return code.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_GUARD = r"""
import os, sys
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
del _hook
_src = open(sys.argv[1]).read()
sys.argv = ["main.py"]
exec(compile(_src, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 5
    wall_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 8
    output_bytes: int = 1 << 20
    max_open_files: int = 64
    max_processes: int = 64


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


def _set_limits(limits: Limits) -> None:
    mb = 1 << 20
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_mb * mb, limits.file_size_mb * mb))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _read_capped(path: Path, cap: int) -> tuple[str, bool]:
    with path.open("rb") as f:
        data = f.read(cap + 1)
    return data[:cap].decode("utf-8", errors="replace"), len(data) > cap


def run_python(
    program: str, stdin: str = "", limits: Limits | None = None, timeout_s: float | None = None
) -> SandboxResult:
    """Run `program` with `stdin` under `limits` (timeout_s overrides limits.wall_s)."""
    limits = limits or Limits()
    wall = timeout_s if timeout_s is not None else limits.wall_s
    with tempfile.TemporaryDirectory(prefix="bm-sandbox-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        (Path(tmp) / "main.py").write_text(program)
        (Path(tmp) / "guard.py").write_text(_GUARD)
        out_p, err_p = Path(tmp) / "stdout", Path(tmp) / "stderr"
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        t0 = time.monotonic()
        with out_p.open("wb") as out, err_p.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(Path(tmp) / "guard.py"), str(Path(tmp) / "main.py")],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                cwd=work,
                env=env,
                start_new_session=True,
                preexec_fn=lambda: _set_limits(limits),
            )
            try:
                proc.communicate(stdin.encode(), timeout=wall)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        elapsed = time.monotonic() - t0
        stdout, cut = _read_capped(out_p, limits.output_bytes)
        stderr, _ = _read_capped(err_p, 64 << 10)
    rc = proc.returncode
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
