#!/usr/bin/env python3
"""Diagnostic: the same relay as branch ssh-relay's ssh_relay.rs (NODELAY + QUICKACK re-armed per read)."""
import asyncio, socket, sys
LPORT, TPORT = int(sys.argv[1]), int(sys.argv[2])
def opts(w):
    s = w.get_extra_info("socket")
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    return s
async def pump(r, w, rs, name, count):
    try:
        while True:
            d = await r.read(65536)
            if not d:
                w.write_eof(); return
            rs.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            count[name] += len(d)
            w.write(d); await w.drain()
    except Exception as e:
        print(f"relay {name}: {e!r} after {count}", file=sys.stderr, flush=True); raise
async def handle(r1, w1):
    r2, w2 = await asyncio.open_connection("127.0.0.1", TPORT)
    s1, s2 = opts(w1), opts(w2)
    count = {"up": 0, "down": 0}
    try:
        await asyncio.gather(pump(r1, w2, s1, "up", count), pump(r2, w1, s2, "down", count))
    finally:
        print(f"relay: connection ended {count}", file=sys.stderr, flush=True)
        w1.close(); w2.close()
async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", LPORT)
    async with srv:
        await srv.serve_forever()
asyncio.run(main())
