"""The job's OpenSSH ``ProxyCommand``: connect to the platform, tune the socket for outages, hand it to ssh.

OpenSSH cannot set ``TCP_USER_TIMEOUT``; without it a cut of more than ~15 minutes
(``tcp_retries2``) drops the connection under sshfs, whose files open at that moment
then fail even after it reconnects.  Kernels that honour the option hold it for the
outage tolerance; others keep their own limit (see :mod:`medbridge.outage`).  With
``ProxyUseFdpass`` ssh takes the connected socket from this process, which then
exits: nothing of ours stays in the data path.

    ProxyCommand python -m medbridge.compute.dial %h %p USER_TIMEOUT_MS
    ProxyUseFdpass yes
"""

from __future__ import annotations

import socket
import sys

from medbridge import outage

CONNECT_TIMEOUT = 30.0


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[1].isdigit() or not argv[2].isdigit():
        sys.stderr.write("usage: python -m medbridge.compute.dial HOST PORT USER_TIMEOUT_MS\n")
        return 2
    host, port, user_timeout = argv[0], int(argv[1]), int(argv[2])
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        sys.stderr.write(f"medbridge: cannot connect to {host}:{port}: {exc.strerror or exc}\n")
        return 1
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    outage.tune(sock, user_timeout)
    with socket.socket(fileno=sys.stdout.fileno()) as to_ssh:
        try:
            socket.send_fds(to_ssh, [b"\0"], [sock.fileno()])
        finally:
            to_ssh.detach()  # stdout is ssh's; it closes it
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
