#!/usr/bin/env python3
"""Test application for the DSR network-namespace suite (netns-tests/dsr.sh).

Listens on TCP (--tcp HOST:PORT: connections from the agent's --forward relay, or spliced by
the proxy on a fallback) and/or on a Unix socket (--unix PATH: the agent's --handoff-socket;
each message carries one TCP socket fd with the payload byte 0x01). Each connection speaks:

  client -> app: u16 length + key (the key header, forwarded by the proxy), then
                 "HDR <hex of those header bytes>\\n"   (the app checks it got exactly them)
  app -> client: "OK <name> <via> <peer ip:port>\\n"    (via: unix or tcp)
  then commands, one line each:
    GET N     -> N pattern bytes (dsr_pattern), then FIN; the app then reads to EOF
    PUT N     -> the app reads N bytes, checks them against the pattern -> "PUTOK N\\n"
                 or "PUTBAD <offset>\\n"
    ECHO N    -> the app reads N bytes and writes them back
    SHUT      -> "SHUTTING\\n", then the app shuts its write side; it still reads
                 "FINAL N\\n" + N pattern bytes, checks them, then EOF, and logs the result
  EOF at a line boundary -> "BYE <commands>\\n", then close (the client's half-close).

One line per connection on stdout: "conn key=K via=V peer=P result=R".
"""

import argparse
import os
import socket
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dsr_pattern import BLOCK, Checker, chunk  # noqa: E402

LOG_LOCK = threading.Lock()


def log(line):
    with LOG_LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class Conn:
    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def fill(self):
        data = self.sock.recv(262144)
        if not data:
            return False
        self.buf += data
        return True

    def read_exact(self, n):
        while len(self.buf) < n:
            if not self.fill():
                return None
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_line(self):
        """A line without its newline; b"" at EOF before any byte; None at EOF mid-line."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > 4096:
                return None
            if not self.fill():
                return b"" if not self.buf else None

    def read_checked(self, n):
        """Reads n bytes and checks them against the pattern; returns (ok, bad_offset)."""
        checker = Checker()
        left = n
        while left > 0:
            if not self.buf and not self.fill():
                return False, checker.offset
            take = min(left, len(self.buf))
            if not checker.feed(self.buf[:take]):
                return False, checker.bad_at
            del self.buf[:take]
            left -= take
        return True, n


def send_pattern(sock, n):
    sent = 0
    block = 0
    while sent < n:
        buf = chunk(block)
        take = min(n - sent, len(buf))
        sock.sendall(memoryview(buf)[:take])
        sent += take
        block += len(buf) // BLOCK


def serve(sock, name, via):
    key = "?"
    result = "?"
    peer = "?"
    try:
        try:
            p = sock.getpeername()
            peer = "%s:%d" % (p[0], p[1])
        except OSError:
            pass
        c = Conn(sock)
        lenb = c.read_exact(2)
        if lenb is None:
            result = "eof-before-header"
            return
        klen = int.from_bytes(lenb, "big")
        keyb = c.read_exact(klen)
        if keyb is None:
            result = "eof-in-header"
            return
        key = keyb.decode("ascii", "replace")
        header = lenb + keyb
        line = c.read_line()
        if not line or not line.startswith(b"HDR "):
            result = "no-hdr-line"
            return
        if line[4:].decode("ascii", "replace") != header.hex():
            sock.sendall(b"ERR header mismatch got=" + header.hex().encode() + b"\n")
            result = "header-mismatch"
            return
        sock.sendall(("OK %s %s %s\n" % (name, via, peer)).encode())
        commands = 0
        while True:
            line = c.read_line()
            if line == b"":
                sock.sendall(b"BYE %d\n" % commands)
                result = "bye after %d commands" % commands
                return
            if line is None:
                result = "eof-mid-line"
                return
            commands += 1
            parts = line.split()
            cmd, n = parts[0], int(parts[1]) if len(parts) > 1 else 0
            if cmd == b"GET":
                send_pattern(sock, n)
                sock.shutdown(socket.SHUT_WR)
                extra = 0
                while c.buf or c.fill():
                    extra += len(c.buf)
                    c.buf.clear()
                result = "get %d sent%s" % (n, "" if extra == 0 else " (then %d unexpected bytes)" % extra)
                return
            elif cmd == b"PUT":
                ok, at = c.read_checked(n)
                sock.sendall(b"PUTOK %d\n" % n if ok else b"PUTBAD %d\n" % at)
                if not ok:
                    result = "put-bad at %d" % at
                    return
            elif cmd == b"ECHO":
                data = c.read_exact(n)
                if data is None:
                    result = "eof-in-echo"
                    return
                sock.sendall(data)
            elif cmd == b"SHUT":
                sock.sendall(b"SHUTTING\n")
                sock.shutdown(socket.SHUT_WR)
                fl = c.read_line()
                if not fl or not fl.startswith(b"FINAL "):
                    result = "final-missing"
                    return
                n = int(fl.split()[1])
                ok, at = c.read_checked(n)
                if not ok:
                    result = "final-bad at %d" % at
                    return
                rest = c.read_line()
                result = "final-ok %d" % n if rest == b"" else "final-then-extra"
                return
            else:
                result = "unknown-command"
                return
    except OSError as e:
        result = "error %s" % e
    finally:
        try:
            sock.close()
        except OSError:
            pass
        log("conn key=%s via=%s peer=%s result=%s" % (key, via, peer, result))


def tcp_loop(listener, name):
    while True:
        s, _ = listener.accept()
        threading.Thread(target=serve, args=(s, name, "tcp"), daemon=True).start()


def unix_agent(conn, name):
    """One agent connection: many messages, each one fd and the byte 0x01."""
    try:
        while True:
            msg, fds, _flags, _addr = socket.recv_fds(conn, 1, 1)
            if not msg and not fds:
                return
            if msg != b"\x01" or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                log("bad hand-off message %r with %d fds" % (msg, len(fds)))
                return
            s = socket.socket(fileno=fds[0])
            # The agent's socket arrives non-blocking (O_NONBLOCK is a file-status flag and
            # travels with the descriptor); this application uses blocking calls.
            s.setblocking(True)
            threading.Thread(target=serve, args=(s, name, "unix"), daemon=True).start()
    finally:
        conn.close()


def unix_loop(listener, name):
    while True:
        c, _ = listener.accept()
        threading.Thread(target=unix_agent, args=(c, name), daemon=True).start()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--tcp", help="HOST:PORT to listen on")
    ap.add_argument("--unix", help="Unix socket path to listen on (--handoff-socket)")
    a = ap.parse_args()
    threads = []
    if a.tcp:
        host, port = a.tcp.rsplit(":", 1)
        lt = socket.create_server((host, int(port)), backlog=512, reuse_port=False)
        threads.append(threading.Thread(target=tcp_loop, args=(lt, a.name), daemon=True))
    if a.unix:
        try:
            os.unlink(a.unix)
        except FileNotFoundError:
            pass
        lu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lu.bind(a.unix)
        lu.listen(64)
        threads.append(threading.Thread(target=unix_loop, args=(lu, a.name), daemon=True))
    if not threads:
        ap.error("need --tcp and/or --unix")
    for t in threads:
        t.start()
    log("listening on %s" % " ".join(x for x in (a.tcp, a.unix) if x))
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
