"""A TCP relay for tests: `python tcprelay.py HOST:PORT` listens on a free port of
127.0.0.1, prints `port N`, and copies every connection made to it both ways to
HOST:PORT, printing `closed` once both directions of one are done.

It stands in front of an iSCSI portal so that a test can make that path stick
(SIGSTOP: whatever the initiator sent waits here, and goes on at SIGCONT) or break
(SIGKILL: both connections close). Standard library only; never imports clusterfs.
"""

from __future__ import annotations

import socket
import sys
import threading


def _pump(src: socket.socket, dst: socket.socket, done: threading.Semaphore) -> None:
    """Copy src to dst until src ends (then half-close dst) or either fails (then
    close both: a broken side breaks the pair, as a gateway would)."""
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    finally:
        done.release()


def _serve_pair(client: socket.socket, upstream: tuple[str, int]) -> None:
    try:
        server = socket.create_connection(upstream)
    except OSError:
        client.close()
        print("closed", flush=True)
        return
    done = threading.Semaphore(0)
    for a, b in ((client, server), (server, client)):
        threading.Thread(target=_pump, args=(a, b, done), daemon=True).start()
    done.acquire()
    done.acquire()
    client.close()
    server.close()
    print("closed", flush=True)


def main() -> None:
    host, _, port = sys.argv[1].rpartition(":")
    upstream = (host, int(port))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    print(f"port {listener.getsockname()[1]}", flush=True)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_serve_pair, args=(client, upstream), daemon=True).start()


if __name__ == "__main__":
    main()
