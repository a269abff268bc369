#!/usr/bin/env python3
"""Test clients for the DSR network-namespace suite (netns-tests/dsr.sh); they talk to
dsr_app.py through the proxy (protocol in dsr_app.py's docstring).

Every connection prints one line "key=K backend=B path=P ... result=R" where path is how the
application got the connection: handoff-socket (passed by the agent over the Unix socket),
forward (relayed by the agent from 127.0.0.1) or spliced (from the proxy host's address).
Exit status 0 only if every connection's bytes were verified.

  download KEY N          GET N bytes, verify every byte against the pattern, then EOF
  frozen KEY              write the request in small pieces right after the header (while the
                          flow is frozen), then many request/response rounds, then both
                          half-closes (two connections)
  many KEY...             all connections at once, each verified, held open until
                          --hold-file exists, then closed cleanly
  echo KEY...             one short request/response each, then the client's half-close
  refused KEY...          the proxy must close each connection without a byte from any
                          backend (EOF or reset), e.g. at the backend's max_connections
"""

import argparse
import os
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dsr_pattern import BLOCK, chunk, pattern_slice  # noqa: E402

OPTS = None


class Fail(Exception):
    pass


class Client:
    def __init__(self, key, nodelay=False):
        self.key = key
        self.header = struct.pack(">H", len(key)) + key.encode()
        self.sock = socket.create_connection((OPTS.vip, OPTS.port), timeout=OPTS.timeout)
        if nodelay:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.backend = "?"
        self.path = "?"

    def hello_bytes(self):
        return self.header + b"HDR " + self.header.hex().encode() + b"\n"

    def fill(self):
        data = self.sock.recv(1 << 20)
        if not data:
            return False
        self.buf += data
        return True

    def read_line(self):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                return line.decode("ascii", "replace")
            if len(self.buf) > 4096 or not self.fill():
                raise Fail("no line (got %r)" % bytes(self.buf[:80]))

    def read_exact(self, n):
        while len(self.buf) < n:
            if not self.fill():
                raise Fail("EOF after %d of %d bytes" % (len(self.buf), n))
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def expect_eof(self):
        if self.buf or self.fill():
            raise Fail("expected EOF, got %r" % bytes(self.buf[:80]))

    def read_ok(self):
        line = self.read_line()
        parts = line.split()
        if len(parts) != 4 or parts[0] != "OK":
            raise Fail("greeting %r" % line)
        self.backend, via, peer = parts[1], parts[2], parts[3]
        ip = peer.rsplit(":", 1)[0]
        if via == "unix":
            self.path = "handoff-socket"
        elif ip == "127.0.0.1":
            self.path = "forward"
        elif ip == OPTS.proxy_ip:
            self.path = "spliced"
        else:
            self.path = "unknown(%s %s)" % (via, peer)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def report(c, result, extra=""):
    print("key=%s backend=%s path=%s %sresult=%s" % (c.key if c else "?", c.backend if c else "?",
                                                     c.path if c else "?", extra, result), flush=True)


def run_one(key, fn):
    c = None
    try:
        c = Client(key, nodelay=(fn is frozen_put))
        extra = fn(c) or ""
        report(c, "ok", extra)
        return True
    except (Fail, OSError) as e:
        report(c, "FAIL " + str(e).replace(" ", "_"), "key=%s " % key if c is None else "")
        return False
    finally:
        if c:
            c.close()


def download(c):
    n = OPTS.bytes
    c.sock.sendall(c.hello_bytes() + b"GET %d\n" % n)
    c.read_ok()
    start = time.monotonic()
    got = 0
    block = 0
    size = 16 * BLOCK
    buf = bytearray(size)
    mv = memoryview(buf)
    # Whatever followed the greeting in the first reads is the start of the stream.
    pre = bytes(c.buf)
    c.buf.clear()
    while got < n:
        want = min(size, n - got)
        fill = min(len(pre), want)
        buf[:fill] = pre[:fill]
        pre = pre[fill:]
        while fill < want:
            r = c.sock.recv_into(mv[fill:want])
            if r == 0:
                raise Fail("EOF after %d of %d bytes" % (got + fill, n))
            fill += r
        expected = chunk(block)
        if buf[:want] != expected[:want]:
            i = next(i for i in range(want) if buf[i] != expected[i])
            raise Fail("byte %d differs from the pattern" % (got + i))
        got += want
        block += 16
    if pre:
        raise Fail("extra bytes after %d" % n)
    c.expect_eof()
    secs = time.monotonic() - start
    return "bytes=%d secs=%.2f MiBps=%.0f " % (got, secs, got / secs / 1048576)


def frozen_put(c):
    """Request bytes in small writes straight after the header, over ~--duration seconds."""
    n, piece = OPTS.stream_bytes, 128
    pieces = (n + piece - 1) // piece
    gap = OPTS.duration / pieces
    c.sock.sendall(c.hello_bytes() + b"PUT %d\n" % n)
    sent = 0
    t0 = time.monotonic()
    # The first pieces go at once: the hand-off (freeze to steer) takes well under a
    # millisecond, so only writes right behind the header are sure to meet the freeze.
    burst = min(pieces, 200)
    while sent < n:
        take = min(piece, n - sent)
        c.sock.sendall(pattern_slice(sent, take))
        sent += take
        if sent // piece < burst:
            continue
        # Then paced against the clock, so the stream spans the hand-off whatever the load.
        delay = t0 + (sent // piece - burst) * gap - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    c.read_ok()
    line = c.read_line()
    if line != "PUTOK %d" % n:
        raise Fail("after PUT: %r" % line)
    rng = __import__("random").Random(c.key)
    for r in range(OPTS.rounds):
        size = rng.randint(1, 20000)
        data = rng.randbytes(size)
        c.sock.sendall(b"ECHO %d\n" % size + data)
        if c.read_exact(size) != data:
            raise Fail("round %d: echo differs" % r)
    # Client half-close: the app sees EOF and still answers.
    c.sock.shutdown(socket.SHUT_WR)
    line = c.read_line()
    if line != "BYE %d" % (OPTS.rounds + 1):
        raise Fail("after our FIN: %r" % line)
    c.expect_eof()
    return "streamed=%d over %.1fs rounds=%d halfclose=client-first " % (n, time.monotonic() - t0, OPTS.rounds)


def app_half_close(c):
    """App half-close: we see EOF and can still send; the app logs what it verified."""
    c.sock.sendall(c.hello_bytes())
    c.read_ok()
    c.sock.sendall(b"SHUT\n")
    if c.read_line() != "SHUTTING":
        raise Fail("no SHUTTING")
    c.expect_eof()
    n = 100000
    c.sock.sendall(b"FINAL %d\n" % n + pattern_slice(0, n))
    c.sock.shutdown(socket.SHUT_WR)
    return "final=%d halfclose=app-first " % n


def echo(c):
    data = os.urandom(OPTS.echo_bytes)
    c.sock.sendall(c.hello_bytes() + b"ECHO %d\n" % len(data) + data)
    c.read_ok()
    if c.read_exact(len(data)) != data:
        raise Fail("echo differs")
    c.sock.shutdown(socket.SHUT_WR)
    if c.read_line() != "BYE 1":
        raise Fail("no BYE")
    c.expect_eof()
    return "echoed=%d " % len(data)


def refused(c):
    """The proxy closes the connection (FIN or RST) without a byte from any backend."""
    try:
        c.sock.sendall(c.hello_bytes() + b"ECHO 4\nping")
        data = c.sock.recv(4096)
    except (ConnectionResetError, BrokenPipeError):
        return "closed=reset "
    if data:
        raise Fail("expected the connection closed, got %r" % bytes(data[:80]))
    return "closed=eof "


def many(keys):
    opened = []
    lock = threading.Lock()
    results = {}

    def opener(key):
        c = None
        try:
            c = Client(key)
            data = os.urandom(1000)
            c.sock.sendall(c.hello_bytes() + b"ECHO 1000\n" + data)
            c.read_ok()
            if c.read_exact(1000) != data:
                raise Fail("echo differs")
            with lock:
                opened.append(c)
        except (Fail, OSError) as e:
            results[key] = "FAIL open " + str(e).replace(" ", "_")
            if c:
                c.close()

    threads = [threading.Thread(target=opener, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("sports " + " ".join(str(c.sock.getsockname()[1]) for c in opened), flush=True)
    print("open %d of %d" % (len(opened), len(keys)), flush=True)
    deadline = time.monotonic() + OPTS.hold_timeout
    while OPTS.hold_file and not os.path.exists(OPTS.hold_file) and time.monotonic() < deadline:
        time.sleep(0.05)

    def closer(c):
        try:
            c.sock.shutdown(socket.SHUT_WR)
            if c.read_line() != "BYE 1":
                raise Fail("no BYE")
            c.expect_eof()
            results[c.key] = "ok"
        except (Fail, OSError) as e:
            results[c.key] = "FAIL close " + str(e).replace(" ", "_")
        finally:
            c.close()

    threads = [threading.Thread(target=closer, args=(c,)) for c in opened]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    byc = {c.key: c for c in opened}
    ok = True
    for k in keys:
        r = results.get(k, "FAIL ?")
        ok = ok and r == "ok"
        c = byc.get(k)
        report(c, r, "" if c else "key=%s " % k)
    return ok


def main():
    global OPTS
    ap = argparse.ArgumentParser()
    ap.add_argument("--vip", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--proxy-ip", required=True, help="the proxy host's own address (spliced peer)")
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--bytes", type=int, default=1 << 30)
    ap.add_argument("--stream-bytes", type=int, default=256000)
    ap.add_argument("--duration", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--echo-bytes", type=int, default=100000)
    ap.add_argument("--hold-file")
    ap.add_argument("--hold-timeout", type=float, default=60)
    ap.add_argument("mode", choices=["download", "frozen", "many", "echo", "refused"])
    ap.add_argument("keys", nargs="+")
    OPTS = ap.parse_args()
    ok = True
    if OPTS.mode == "download":
        ok = run_one(OPTS.keys[0], download)
    elif OPTS.mode == "frozen":
        ok = run_one(OPTS.keys[0], frozen_put)
        ok = run_one(OPTS.keys[0], app_half_close) and ok
    elif OPTS.mode == "many":
        ok = many(OPTS.keys)
    elif OPTS.mode == "refused":
        for k in OPTS.keys:
            ok = run_one(k, refused) and ok
    else:
        for k in OPTS.keys:
            ok = run_one(k, echo) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
