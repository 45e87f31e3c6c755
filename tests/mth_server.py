"""A process that imports mthlib once and runs each ``mth`` command (or Python block) in a forked child.

``tests/test_tutorials.py`` runs a hundred ``mth`` commands; each would spend most of its time
importing torch, transformers and Lightning. :func:`clients` starts :func:`serve` and writes an
``mth`` (and a ``run-python-block``) client into a folder: put it first on ``PATH`` and the
commands of a shell script reach the server. The client hands over its argv, working folder,
environment and standard streams; the child runs ``mthlib.cli.main()`` as the console script
does, with the script's folder and then ``PYTHONPATH`` on ``sys.path``, and its exit status
comes back. Variables read only when a process starts (``MALLOC_MMAP_THRESHOLD_``) have no
effect in the child, and the server starts with one OpenMP thread (``OMP_NUM_THREADS=1``), so
no thread pool is forked.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import socket
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

CLIENT = """#!{python} -IS
import json, os, socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as server:
    server.connect({address!r})
    request = {{"kind": {kind!r}, "argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}
    socket.send_fds(server, [json.dumps(request).encode()], [0, 1, 2])
    sys.exit(int(server.recv(16)))
"""

PRELOADED = ("mthlib.cli", "mthlib.export", "mthlib.tools", "transformers.generation.utils",
             "transformers.models.llama.modeling_llama")
"""What the server imports before it forks: the imports every command pays, paid once."""


def serve(address: str) -> None:
    """Import mthlib once, then run each request in a forked child until the parent process ends."""
    base_path = sys.path[1:]  # sys.path[0] is this ``-c`` process's working folder
    parent = os.getppid()
    for module in PRELOADED:
        importlib.import_module(module)
    from mthlib.masking import load_short_names

    load_short_names()  # what every command does first: import the registered strategies

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as server:
        server.bind(address)
        server.listen()
        server.settimeout(5)
        print("ready", flush=True)
        while os.getppid() == parent:
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                data, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
                pid = os.fork()
                if pid == 0:
                    os._exit(_child(json.loads(data), fds, base_path))
                for fd in fds:
                    os.close(fd)
                status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                with contextlib.suppress(OSError):  # the client may be gone (a test timed out)
                    connection.send(str(status if status >= 0 else 128 - status).encode())


def _child(request: dict, fds: list[int], base_path: list[str]) -> int:
    """Run one ``mth`` command or Python block as its own process would; return the exit status."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    extra = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if request["kind"] == "mth":  # as the console script: its folder first on sys.path
        from mthlib.cli import main as run

        sys.argv, sys.path[:] = [str(BIN / "mth"), *request["argv"]], [str(BIN), *extra, *base_path]
    else:  # as code pasted into ``python``: the working folder first
        sys.argv, sys.path[:] = ["-"], ["", *extra, *base_path]

        def run() -> None:
            runpy.run_path(request["argv"][0], run_name="__main__")

    try:
        code = run()
    except SystemExit as exit_:
        code = exit_.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code or 0


@contextlib.contextmanager
def clients(folder: Path, env: dict[str, str]) -> Iterator[Path]:
    """Run a server in ``env`` (with one OpenMP thread) while the block lasts; yield the folder of its clients."""
    address = str(folder / "server.sock")
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tests.mth_server import serve; serve(sys.argv[1])", address],
        cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout.readline().strip() == "ready", "the mth server did not start"
        for name, kind in (("mth", "mth"), ("run-python-block", "python")):
            (folder / name).write_text(CLIENT.format(python=sys.executable, address=address, kind=kind))
            (folder / name).chmod(0o755)
        yield folder
    finally:
        server.terminate()
        server.wait(timeout=30)
