"""Each local rank's output, whole lines prefixed with ``[rankN]``: ranks never mix within a line, and every line
says which rank wrote it (what torchrun's ``--tee`` prefixes do for its workers).

Megatron prints its iteration line from the *last* rank and its set-up from rank 0, so "rank 0 only" would hide
the training progress; prefixing keeps everything. The rank's file descriptors 1 and 2 become pipes (so C/C++
writes, gloo's and torch's, are covered, and so are the rank's own child processes, e.g. Megatron's checkpoint
workers, which inherit them); one thread per stream reads them and writes each complete line with one
``os.write`` to the original descriptor (a write below PIPE_BUF is never split by another process's).
"""

from __future__ import annotations

import os
import sys
import threading

_CHUNK = 65536


def _pump(read_fd: int, out_fd: int, prefix: bytes) -> None:
    pending = b""
    while True:
        try:
            chunk = os.read(read_fd, _CHUNK)
        except OSError:
            chunk = b""
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if lines:
            os.write(out_fd, b"".join(prefix + line + b"\n" for line in lines))
    if pending:
        os.write(out_fd, prefix + pending + b"\n")
    os.close(read_fd)


class PrefixedOutput:
    """Route file descriptors 1 and 2 of this process through line-prefixing pipes until ``close``."""

    def __init__(self, rank: int) -> None:
        self.prefix = f"[rank{rank}] ".encode()
        self._saved: list[tuple[int, int]] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> PrefixedOutput:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            read_fd, write_fd = os.pipe()
            saved = os.dup(fd)
            os.dup2(write_fd, fd)
            os.close(write_fd)
            thread = threading.Thread(target=_pump, args=(read_fd, saved, self.prefix), daemon=True,
                                      name=f"rank-output-{fd}")
            thread.start()
            self._saved.append((fd, saved))
            self._threads.append(thread)
        # Python's own streams write whole lines promptly (a pipe would make them block-buffered).
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(line_buffering=True)
        return self

    def close(self, timeout_s: float = 2.0) -> None:
        """Flush, give the descriptors back, and let the pumps write what is left (bounded: a child process
        that still holds a pipe, e.g. a checkpoint worker, keeps it open; its later lines are then dropped)."""
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self._saved:
            os.dup2(saved, fd)  # closes this process's write end of the pipe
        for thread in self._threads:
            thread.join(timeout_s)
        self._saved.clear()
        self._threads.clear()
