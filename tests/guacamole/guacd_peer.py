#!/usr/bin/env python3
"""guacd_peer: a TEST DOUBLE for guacd, used by exoagent's tests. It is NOT guacd.

Apache Guacamole's guacd (the C daemon) cannot be installed from the registries the project's
test machines reach, so this program stands in for it: it listens on a loopback TCP port and
speaks guacd's side of the Guacamole protocol to a Guacamole client (in the tests: exoagent's
tunnel relay, or the self-test's client). Where it can, it draws from REAL remote sessions
instead of synthetic frames: a real VNC server (TigerVNC Xvnc) through its own small RFB 3.8
client, and a real SSH server (OpenSSH sshd) through asyncssh, with pyte as the terminal
emulator and Pillow rendering the terminal into PNG images.

What it implements
  * Framing: ``LENGTH.VALUE,...;`` instructions, LENGTH in Unicode code points, UTF-8 decoded
    incrementally across reads; guacd's parser limits (8192 bytes, 128 elements per
    instruction).
  * Handshake: ``select`` (``ssh`` or ``vnc``) -> ``args`` (``VERSION_1_5_0`` first, then the
    parameter names of guacd 1.6.0's ssh / vnc plugins, in guacd's order) -> ``size`` /
    ``audio`` / ``video`` / ``image`` / ``timezone`` / ``name`` in any order -> ``connect`` with
    one value per arg -> ``ready,$<uuid>``. A bad handshake is answered with
    ``error,<message>,768`` (CLIENT_BAD_REQUEST) and the connection is closed. Without a
    complete handshake after 15 s (guacd's GUACD_TIMEOUT) the connection is closed silently, as
    guacd does.
  * Interactive phase, peer -> client: ``size,0,W,H``; PNG images as ``img`` + ``blob``... +
    ``end`` on layer 0 (whole screen first, then the changed rectangles); ``sync,<ms>`` after
    every frame (the next frame waits up to 0.5 s for the client's ``sync`` reply); ``nop``
    after 5 s without output (guacd's keep-alive); ``filesystem`` objects; ``body`` streams
    answering ``get``; ``clipboard`` streams (VNC); ``ack``; ``error``; ``disconnect``.
  * Interactive phase, client -> peer: ``sync``, ``mouse``, ``key``, ``size``, ``clipboard`` +
    ``blob``/``end``, ``file`` uploads, ``put`` and ``get`` on the filesystem object, ``ack``
    (drives downloads), ``nop``, ``disconnect``. A client silent for 15 s is dropped (guacd's
    user timeout).
  * File streams paced as guacd's SFTP code paces them (src/common-ssh/sftp.c), since that
    pacing sets how fast a transfer can go: an upload (``file`` or ``put``) is acked once
    the file is open (``SFTP: File opened``), then each ``blob`` once it is written
    (``SFTP: OK``, or ``SFTP: Write failed``/512 and the next blobs are still written and
    acked, as guac_common_ssh_sftp_blob_handler does), then ``end`` once the file is closed
    (``SFTP: OK`` or ``SFTP: Close failed``/512). A download (``get`` of a file) answers
    ``body`` and sends nothing until the client acks it; then each successful client ``ack``
    gets exactly one ``blob`` of at most 4096 bytes (guac_common_ssh_sftp_ack_handler's
    buffer), ``end`` at the end of the file (also after a read error, as guacd does), and an
    error ``ack`` ends the stream without ``end``. So at most one blob is in flight per
    stream in either direction: one blob per round trip. The SFTP side paces as guacd
    1.3.0's libssh2 (Debian 11: 1.9.0, src/sftp.c) does on guacd's blocking SFTP session: a
    download reads ahead 16 KiB (``buffer_size*4``) in one ``FXP_READ`` whenever its buffer is
    empty, so three acks in four are answered from memory (``SftpFileStream``); an upload's
    blob is one ``libssh2_sftp_write`` of the blob's length, which builds one ``FXP_WRITE``
    (blobs are under ``MAX_SFTP_OUTGOING_SIZE``, 30,000 bytes) and, the session blocking,
    returns only once sshd's ``FXP_STATUS`` for it came back: libssh2 pipelines a write only
    across the chunks of one call, and guacd's calls are one chunk each, so the double writes
    each blob, waits for its status, then acks, as guacd does.
  * ``vnc``: RFB 3.3/3.7/3.8, security None or VNC authentication (DES), encodings Raw and
    CopyRect, pseudo-encodings DesktopSize and ExtendedDesktopSize (client ``size`` becomes an
    RFB SetDesktopSize unless ``disable-display-resize`` is true); at most 10 frames per second;
    mouse -> PointerEvent, key -> KeyEvent (Guacamole keysyms are X11 keysyms);
    ServerCutText -> ``clipboard`` stream, ``clipboard`` stream -> ClientCutText (Latin-1, as
    RFB defines). With ``enable-sftp``: SFTP (asyncssh) to sftp-hostname/port/username/password
    (or sftp-private-key) exposed as a ``filesystem`` object, connected after the VNC server and
    before the display is sized, as guacd does; if it fails the whole session is aborted
    (``error`` before any drawing), as every guacd from 1.3.0 to 1.6.0 does.
  * ``ssh``: password or private-key auth (optional ``host-key`` check), a PTY sized from the
    display size, dpi and ``font-size`` (default 12 pt), the login shell or ``command``;
    ``terminal-type`` (default ``linux``), ``backspace``, ``color-scheme`` (gray-black,
    black-white, white-black, green-black), resize from ``size``; output rendered after it
    settles (30 ms) with DejaVu Sans Mono. Keys: printable and Unicode keysyms, Return,
    BackSpace, Tab, Escape, arrows (normal and application mode), Home/End/Insert/Delete/
    PageUp/PageDown, F1-F12, keypad, Ctrl+key, Alt+key. With ``enable-sftp``: the filesystem
    object (root ``sftp-root-directory``, default ``/`` as in guacd), uploads and downloads,
    directory listings as ``application/vnd.glyptodon.guacamole.stream-index+json``.
  * Text streams as guacd 1.6 writes them, bytes included: directory listings in raw UTF-8
    with only ``"`` and ``\\`` escaped, cut into blobs by a 4096-byte buffer, one blob per
    client ack (``guacd_json_blobs``: src/common/json.c, src/common/common/json.h,
    guac_common_ssh_sftp_ls_ack_handler in src/common-ssh/sftp.c); clipboard text to the
    client in raw UTF-8 blocks of 4096 bytes cut at byte boundaries (guac_common_clipboard_send
    in src/common/clipboard.c), so a character can straddle two blobs. Clipboard text from
    the client is checked as strict UTF-8 (``valid_utf8`` in its event).
  * Uploads through ``file`` go to ``sftp-directory`` (vnc) if given, else
    ``sftp-root-directory`` if given, else the SFTP user's home directory; files are created
    with mode 0600. ``sftp-disable-upload`` / ``sftp-disable-download`` are honoured.
  * Upstream failures, as guacd does after ``ready``: ``error,<message>,<status>`` then
    ``disconnect`` (unreachable 519, authentication 769, timeout 514, server gone 520, other
    515; the statuses are this double's choice, close to guacd's). SSH connects in guacd
    1.3.0's two steps: a refused TCP connect is 519, a handshake that fails after it 515. A shell that exits ends the
    connection with ``disconnect``.
  * A record for the tests (``--events FILE``): one JSON object per line per notable event,
    never containing a password, passphrase or private key (see ``EventLog``). An event is
    written before the client can see its effect (e.g. ``upload`` before the last ``ack``).

Test knobs (environment; guacd has none of them)
  * ``GUACD_PEER_FAIL_READ_AFTER=<bytes>``: an SFTP download (``get`` of a file) fails its
    next read once it has sent at least ``<bytes>`` bytes (reads are 4096-byte blocks, so it
    ends at the first multiple of 4096 at or past ``<bytes>``, or at the file's end if that
    comes first; ``0`` fails the first read). The double then does what guacd 1.3.0 does
    when ``libssh2_sftp_read`` fails (guac_common_ssh_sftp_ack_handler,
    src/common-ssh/sftp.c): the same ``end`` as at the end of the file, the stream freed and
    the file closed; guacd's INFO log line "Error reading file" becomes the event
    ``download_error`` (``guacd_log``, ``error``, ``sent``), and the ``download`` event says
    ``complete: false``. ``GUACD_PEER_FAIL_READ_NAME=<base name>`` limits it to downloads of
    files of that base name (so one suite can run normal downloads beside it). A value that
    is not a number, or a name with ``/``, stops the double at start with a message naming
    the variable.

What it does NOT implement (differences from guacd)
  * SFTP pacing, what remains different: asyncssh (Python, an event loop) stands where
    libssh2 (C) does, so each SFTP round trip and each blob costs more CPU here than in guacd:
    measured through the web side at link speed (bench/results/file-transfer.md, release
    build, 256 MiB), the double moves uploads at ~0.8 ms per blob (guacd 1.3.0: ~0.5 ms) and
    downloads at ~0.4 ms per blob (guacd: ~0.6 ms; three blobs in four come from the
    read-ahead, where Python is cheap), so it is slower than guacd on uploads and faster on
    downloads there; at rates far below that (one blob per browser round trip) it paces as
    guacd does;
    libssh2's receive-window adjustments and its requests cut at ``MAX_SFTP_READ_SIZE`` are
    not reproduced (asyncssh manages its own window; 16 KiB requests are below both limits).
    guacd handles one user's instructions on one thread, so a blob written to SFTP holds up
    that user's other instructions; the double awaits the write in the same per-connection
    loop, which has the same effect.
  * No RDP, telnet or kubernetes. A protocol without a plugin (any but ssh and vnc, or one
    named by ``--without-plugin``) is what guacd 1.6 does when it cannot load
    ``libguac-client-<protocol>``: ``select`` gets no answer at all, and the connection stays
    open until the handshake timeout (15 s; guacd was seen silent and open for at least 10 s,
    the exact moment it closes is not reproduced). Joining a running connection
    (``select,$<id>``) is refused with ``error,...,516``.
  * Drawing is PNG ``img`` only: no ``copy``/``rect``/``cfill``/``cursor`` instructions, no
    JPEG/WebP, no extra layers, no audio, no video, no session recording or typescripts.
    TigerVNC draws the pointer into the framebuffer because no Cursor pseudo-encoding is
    asked for.
  * VNC: no TLS/VeNCrypt/other security types (so ``username`` is unused), no Tight/ZRLE/
    Hextile encodings, no repeater or reverse connections, no ``autoretry``; ``read-only``,
    ``disable-copy`` and ``disable-paste`` are honoured, the other tuning parameters are
    accepted and ignored. PNG is sent whatever the client's ``image`` instruction lists.
  * SSH: no interactive username/password prompts on the terminal (both must be given, or a
    private key), no SSH agent forwarding, no scrollback, text selection or clipboard (pasting
    from the client is accepted and ignored), no ``guacctl`` file transfer commands, no
    wake-on-LAN, no locale/timezone environment. The terminal is rendered by pyte, so escape
    sequence coverage is pyte's, not guacd's.
  * Keysyms outside Latin-1, the Unicode range (0x01000000+) and the common function keys are
    ignored for SSH (VNC forwards every keysym).
  * One user per connection; no session sharing, no ``argv`` streams, no ``required``
    instruction, no ``msg``.
  * ``put`` of a name that escapes the root, or ``file`` with an illegal name: guacd's put
    handler sends no ack at all for an untranslatable name (the client waits); the double
    answers ``SFTP: Invalid path``/768. A failed open answers ``SFTP: Open failed`` with the
    status mapped from the SFTP error, as guacd does, but guacd then still writes the
    stream's blobs to a null handle (acking each ``SFTP: Write failed``) while the double
    forgets the stream (later blobs get ``No such stream``, RESOURCE_NOT_FOUND).
  * Text streams: guacd's listing ack handler reads the next directory entry before noticing
    that a blob went out, so it drops one entry at every blob boundary of a listing larger
    than 4096 bytes; the double lists every entry. Names longer than guacd's path limit
    (GUAC_COMMON_SSH_SFTP_MAX_PATH) are listed, not skipped. VNC clipboard is always the
    classic Latin-1 cut text (``clipboard-encoding`` is ignored; characters above U+00FF
    become ``?``, as guacd's ISO8859-1 writer does); the RFB Extended Clipboard that newer
    guacd sources use with ``clipboard-encoding=UTF-8`` is not implemented.

Requirements: Python 3.11 with the packages of requirements.txt (``setup.sh`` makes a venv);
without them the handshake still works but every session ends with ``error,...,512``.

CLI
  python3 tests/guacamole/guacd_peer.py --listen 127.0.0.1:4822 [--events FILE]
      [--handshake-timeout 15] [--client-timeout 15] [--without-plugin ssh|vnc]...
Port 0 picks a free port; the address actually bound is printed on stdout as
``guacd_peer listening on HOST:PORT`` and logged as the first event. SIGTERM or SIGINT sends
``disconnect`` to every session, closes them and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import base64
import codecs
import contextlib
import io
import json
import os
import posixpath
import signal
import stat
import struct
import sys
import time
import uuid
from collections import deque

PROTOCOL_VERSION = "VERSION_1_5_0"

# Parameter names in the order guacd 1.6.0's plugins announce them (src/protocols/*/settings.c).
SSH_ARGS = [
    "hostname", "host-key", "port", "timeout", "username", "password", "font-name", "font-size",
    "enable-sftp", "sftp-root-directory", "sftp-disable-download", "sftp-disable-upload",
    "private-key", "passphrase", "public-key", "enable-agent", "color-scheme", "command",
    "typescript-path", "typescript-name", "create-typescript-path", "typescript-write-existing",
    "recording-path", "recording-name", "recording-exclude-output", "recording-exclude-mouse",
    "recording-include-keys", "create-recording-path", "recording-write-existing", "read-only",
    "server-alive-interval", "backspace", "terminal-type", "scrollback", "locale", "timezone",
    "clipboard-buffer-size", "disable-copy", "disable-paste", "wol-send-packet", "wol-mac-addr",
    "wol-broadcast-addr", "wol-udp-port", "wol-wait-time",
]
VNC_ARGS = [
    "hostname", "port", "read-only", "disable-display-resize", "encodings", "username",
    "password", "swap-red-blue", "color-depth", "cursor", "autoretry", "clipboard-encoding",
    "dest-host", "dest-port", "enable-audio", "audio-servername", "reverse-connect",
    "listen-timeout", "enable-sftp", "sftp-hostname", "sftp-host-key", "sftp-port",
    "sftp-timeout", "sftp-username", "sftp-password", "sftp-private-key", "sftp-passphrase",
    "sftp-public-key", "sftp-directory", "sftp-root-directory", "sftp-server-alive-interval",
    "sftp-disable-download", "sftp-disable-upload", "recording-path", "recording-name",
    "recording-exclude-output", "recording-exclude-mouse", "recording-include-keys",
    "create-recording-path", "recording-write-existing", "clipboard-buffer-size", "disable-copy",
    "disable-paste", "disable-server-input", "wol-send-packet", "wol-mac-addr",
    "wol-broadcast-addr", "wol-udp-port", "wol-wait-time", "force-lossless", "compress-level",
    "quality-level",
]
PROTOCOLS = {"ssh": SSH_ARGS, "vnc": VNC_ARGS}
SECRET_ARGS = {
    "password", "passphrase", "private-key", "sftp-password", "sftp-passphrase",
    "sftp-private-key",
}

# Guacamole status codes (guacamole-server src/libguac/guacamole/protocol-types.h).
SUCCESS = 0x0000
UNSUPPORTED = 0x0100
SERVER_ERROR = 0x0200
UPSTREAM_TIMEOUT = 0x0202
UPSTREAM_ERROR = 0x0203
RESOURCE_NOT_FOUND = 0x0204
UPSTREAM_NOT_FOUND = 0x0207
UPSTREAM_UNAVAILABLE = 0x0208
CLIENT_BAD_REQUEST = 0x0300
CLIENT_UNAUTHORIZED = 0x0301
CLIENT_FORBIDDEN = 0x0303

MAX_INSTRUCTION_BYTES = 8192     # GUAC_INSTRUCTION_MAX_LENGTH
MAX_ELEMENTS = 128               # GUAC_INSTRUCTION_MAX_ELEMENTS
MAX_DIGITS = 5                   # GUAC_INSTRUCTION_MAX_DIGITS
BLOB_MAX = 6048                  # GUAC_PROTOCOL_BLOB_MAX_LENGTH (bytes before base64)
JSON_BUFFER = 4096               # guac_common_json_state.buffer (src/common/common/json.h)
CLIPBOARD_BLOCK = 4096           # GUAC_COMMON_CLIPBOARD_BLOCK_SIZE (src/common/common/clipboard.h)
SFTP_BLOCK = 4096                # guacd's SFTP transfer block
SFTP_READ_AHEAD = 4 * SFTP_BLOCK  # libssh2 1.9.0 sftp_read: max_read_ahead = buffer_size*4
KEEPALIVE_INTERVAL = 5.0         # GUAC_SOCKET_KEEP_ALIVE_INTERVAL
STREAM_INDEX_MIMETYPE = "application/vnd.glyptodon.guacamole.stream-index+json"
FONT_DIR = "/usr/share/fonts/truetype/dejavu"
SYNC_WAIT = 0.5                  # how long a frame waits for the previous frame's sync reply
VNC_FRAME_INTERVAL = 0.1         # at most 10 frames per second
SSH_SETTLE = 0.03                # terminal output debounce


async def wait_for(aw, timeout: float):
    """asyncio.wait_for without Python 3.11's flaw: its wait_for can swallow a cancellation
    that arrives as the awaited thing completes (the task then runs on). asyncio.timeout()
    does not."""
    async with asyncio.timeout(timeout):
        return await aw


def utf8_valid(data: bytes) -> bool:
    """Strict UTF-8 (no encoded surrogates, as Python's codec and guacd's reader require)."""
    try:
        data.decode("utf-8", "strict")
    except UnicodeDecodeError:
        return False
    return True


def now_ms() -> int:
    return int(time.time() * 1000)


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def int_or(value: str | None, default: int) -> int:
    try:
        return int((value or "").strip())
    except ValueError:
        return default


# ----------------------------------------------------------------------------------------------
# Protocol framing


class ProtocolError(Exception):
    pass


def encode(*elements: object) -> bytes:
    """One instruction; LENGTH counts code points (Python str length)."""
    parts = []
    for element in elements:
        s = str(element)
        parts.append(f"{len(s)}.{s}")
    return (",".join(parts) + ";").encode("utf-8")


class Parser:
    """Incremental parser: feed bytes, take complete instructions (lists of str)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._buf = ""
        self._pos = 0
        self._elements: list[str] = []
        self._start = 0
        self.ready: deque[list[str]] = deque()

    def feed(self, data: bytes) -> None:
        try:
            self._buf += self._decoder.decode(data)
        except UnicodeDecodeError as e:
            raise ProtocolError(f"invalid UTF-8: {e}") from None
        self._parse()

    def _parse(self) -> None:
        buf = self._buf
        pos = self._pos
        while True:
            dot = buf.find(".", pos, pos + MAX_DIGITS + 1)
            if dot < 0:
                if len(buf) - pos > MAX_DIGITS:
                    raise ProtocolError("element length too long or missing '.'")
                break
            digits = buf[pos:dot]
            if not digits.isdigit() or not digits.isascii():
                raise ProtocolError(f"bad element length {digits!r}")
            length = int(digits)
            end = dot + 1 + length
            if end >= len(buf):
                if end - self._start > MAX_INSTRUCTION_BYTES * 4:
                    raise ProtocolError("instruction too long")
                break
            value = buf[dot + 1:end]
            term = buf[end]
            self._elements.append(value)
            if len(self._elements) > MAX_ELEMENTS:
                raise ProtocolError("too many elements in one instruction")
            pos = end + 1
            if term == ";":
                raw = buf[self._start:pos]
                if len(raw.encode("utf-8")) > MAX_INSTRUCTION_BYTES:
                    raise ProtocolError("instruction longer than 8192 bytes")
                self.ready.append(self._elements)
                self._elements = []
                self._start = pos
            elif term != ",":
                raise ProtocolError(f"bad terminator {term!r}")
        # Drop what has been consumed.
        self._buf = buf[self._start:]
        self._pos = pos - self._start
        self._start = 0


# ----------------------------------------------------------------------------------------------
# Event log


class EventLog:
    """One JSON object per line: {"ts": epoch seconds, "event": NAME, "conn": ID, ...}.

    Events: listening, connection, handshake (protocol, version, args without secrets: a secret
    that was given is shown as "<redacted>", size, audio, video, image, timezone, name),
    handshake_failed, ready, upstream_connected, upstream_failed, filesystem, typed (text,
    submitted), mouse (button changes only), clipboard, resize, upload, upload_failed, listing,
    download, get_failed, client_timeout, error, disconnect (reason, syncs_acked and the
    session's counters keys, mouse, frames; for ssh also "screen": the terminal's non-blank
    lines as pyte shows them), shutdown.
    """

    def __init__(self, path: str | None) -> None:
        self._fh = open(path, "a", encoding="utf-8") if path else None

    def write(self, _event: str, _conn: str | None = None, **fields: object) -> None:
        if not self._fh:
            return
        record = {"ts": round(time.time(), 3), "event": _event, "conn": _conn}
        record.update(fields)
        self._fh.write(json.dumps(record, sort_keys=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh:
            self._fh.close()


def redact(params: dict[str, str]) -> dict[str, str]:
    return {k: ("<redacted>" if k in SECRET_ARGS and v else v) for k, v in params.items()}


# ----------------------------------------------------------------------------------------------
# Keysyms

MOD_KEYSYMS = {
    0xFFE1: "shift", 0xFFE2: "shift", 0xFFE3: "ctrl", 0xFFE4: "ctrl",
    0xFFE7: "alt", 0xFFE8: "alt", 0xFFE9: "alt", 0xFFEA: "alt",
}
KEYPAD_CHARS = {0xFFAA: "*", 0xFFAB: "+", 0xFFAC: ",", 0xFFAD: "-", 0xFFAE: ".", 0xFFAF: "/",
                0xFFBD: "="}


def keysym_to_char(keysym: int) -> str | None:
    if 0x20 <= keysym <= 0x7E or 0xA0 <= keysym <= 0xFF:
        return chr(keysym)
    if keysym & 0xFF000000 == 0x01000000:
        cp = keysym & 0x00FFFFFF
        if cp <= 0x10FFFF:
            return chr(cp)
        return None
    if 0xFFB0 <= keysym <= 0xFFB9:
        return chr(ord("0") + keysym - 0xFFB0)
    return KEYPAD_CHARS.get(keysym)


class Modifiers:
    def __init__(self) -> None:
        self.down: set[int] = set()

    def update(self, keysym: int, pressed: bool) -> bool:
        """Track modifier keys; True if keysym was a modifier."""
        if keysym in MOD_KEYSYMS:
            if pressed:
                self.down.add(keysym)
            else:
                self.down.discard(keysym)
            return True
        return False

    def has(self, name: str) -> bool:
        return any(MOD_KEYSYMS[k] == name for k in self.down)


class TypedText:
    """What the user typed, as text, logged line by line (on Return) for the tests."""

    def __init__(self, conn: "Connection") -> None:
        self.conn = conn
        self.buf: list[str] = []

    def key(self, keysym: int, mods: Modifiers) -> None:
        if keysym in (0xFF0D, 0xFF8D):
            self.flush(True)
            return
        if keysym == 0xFF08:
            if self.buf:
                self.buf.pop()
            return
        if keysym == 0xFF09:
            self.buf.append("\t")
            return
        ch = keysym_to_char(keysym)
        if ch is None:
            return
        if mods.has("ctrl") and ch.isascii() and ch.isalpha():
            self.buf.append("^" + ch.upper())
        else:
            self.buf.append(ch)

    def flush(self, submitted: bool) -> None:
        if self.buf or submitted:
            self.conn.event("typed", text="".join(self.buf), submitted=submitted)
        self.buf = []


# ----------------------------------------------------------------------------------------------
# Display: PNG frames on the default layer


class Display:
    def __init__(self, conn: "Connection") -> None:
        self.conn = conn
        self.width = 0
        self.height = 0
        self.prev = None  # PIL image last sent
        self.lock = asyncio.Lock()
        self.frames = 0

    def set_size(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.prev = None
        self.conn.send("size", 0, width, height)

    async def frame(self, image, rects: list[tuple[int, int, int, int]] | None = None) -> bool:
        """Send what changed in image (a PIL RGB image of the whole screen) as PNG img.

        rects: changed rectangles (x, y, w, h) when known; otherwise they are found by diffing
        against the previous frame. Returns whether anything was sent.
        """
        from PIL import ImageChops

        async with self.lock:
            if self.conn.closed:
                return False
            if self.prev is None or self.prev.size != image.size:
                rects = [(0, 0, image.width, image.height)]
            elif rects is None:
                bbox = ImageChops.difference(self.prev, image).getbbox()
                if bbox is None:
                    return False
                rects = [(bbox[0], bbox[1], bbox[2] - bbox[0], bbox[3] - bbox[1])]
            elif len(rects) > 16:
                x0 = min(r[0] for r in rects)
                y0 = min(r[1] for r in rects)
                x1 = max(r[0] + r[2] for r in rects)
                y1 = max(r[1] + r[3] for r in rects)
                rects = [(x0, y0, x1 - x0, y1 - y0)]
            rects = [r for r in rects if r[2] > 0 and r[3] > 0]
            if not rects:
                return False
            await self.conn.wait_sync_ack()
            crops = [(x, y, image.crop((x, y, x + w, y + h))) for x, y, w, h in rects]
            self.prev = image.copy()
            pngs = await asyncio.to_thread(
                lambda: [(x, y, png_bytes(c)) for x, y, c in crops])
            for x, y, data in pngs:
                stream = self.conn.alloc_stream()
                self.conn.send("img", stream, 14, 0, "image/png", x, y)
                for i in range(0, len(data), BLOB_MAX):
                    self.conn.send("blob", stream,
                                   base64.b64encode(data[i:i + BLOB_MAX]).decode("ascii"))
                self.conn.send("end", stream)
                self.conn.free_stream(stream)
            self.conn.send_sync()
            self.frames += 1
            await self.conn.drain()
            return True


def png_bytes(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# SFTP exposed as a Guacamole filesystem object


def sftp_status(exc: BaseException) -> int:
    import asyncssh

    if isinstance(exc, asyncssh.SFTPNoSuchFile):
        return RESOURCE_NOT_FOUND
    if isinstance(exc, asyncssh.SFTPPermissionDenied):
        return CLIENT_FORBIDDEN
    return SERVER_ERROR


class OutboundStream:
    """A peer -> client stream that sends one blob per client ack (guacd's SFTP flow)."""

    def __init__(self, conn: "Connection", index: int, on_done=None) -> None:
        self.conn = conn
        self.index = index
        self.on_done = on_done
        self.sent = 0

    async def next_block(self) -> bytes:  # b"" at the end
        raise NotImplementedError

    async def close_source(self) -> None:
        pass

    async def on_ack(self, message: str, status: int) -> None:
        if status != SUCCESS:
            await self.finish(False)
            return
        try:
            data = await self.next_block()
        except Exception as e:  # noqa: BLE001 - any read failure ends the stream
            # guac_common_ssh_sftp_ack_handler (guacd 1.3.0) on a failed
            # libssh2_sftp_read: logs "Error reading file" at INFO and sends the same `end` as at
            # the end of the file; the client cannot tell the two apart.
            self.conn.event("download_error", error=str(e), guacd_log="Error reading file",
                            sent=self.sent)
            await self.finish(False, send_end=True)
            return
        if data:
            self.sent += len(data)
            self.conn.send("blob", self.index, base64.b64encode(data).decode("ascii"))
        else:
            await self.finish(True, send_end=True)

    async def finish(self, ok: bool, send_end: bool = False) -> None:
        if self.conn.out_streams.pop(self.index, None) is None:
            return
        await self.close_source()
        if self.on_done:
            self.on_done(ok, self.sent)  # logged before the client can see the end
        if send_end:
            self.conn.send("end", self.index)
        self.conn.free_stream(self.index)


class BytesStream(OutboundStream):
    def __init__(self, conn, index, data: bytes, on_done=None) -> None:
        super().__init__(conn, index, on_done)
        self.data = data
        self.offset = 0

    async def next_block(self) -> bytes:
        block = self.data[self.offset:self.offset + SFTP_BLOCK]
        self.offset += len(block)
        return block


class BlobsStream(OutboundStream):
    """Sends precomputed blobs, one per client ack; the last one travels with ``end`` (as
    guacd's listing does: its ack handler writes entries until a blob is flushed, and at the
    end of the directory flushes the rest and ends the stream in the same call)."""

    def __init__(self, conn, index, blobs: list[bytes], on_done=None) -> None:
        super().__init__(conn, index, on_done)
        self.blobs = deque(blobs)

    async def next_block(self) -> bytes:
        return self.blobs.popleft() if self.blobs else b""

    async def on_ack(self, message: str, status: int) -> None:
        if status != SUCCESS or len(self.blobs) != 1:
            await super().on_ack(message, status)
            return
        data = self.blobs.popleft()
        self.sent += len(data)
        self.conn.send("blob", self.index, base64.b64encode(data).decode("ascii"))
        await self.finish(True, send_end=True)


def guacd_json_blobs(listing: dict[str, str]) -> list[bytes]:
    """A directory listing as the blobs guacd 1.6 sends (src/common/json.c with the 4096-byte
    buffer of src/common/common/json.h, driven by guac_common_ssh_sftp_ls_ack_handler in
    src/common-ssh/sftp.c): raw UTF-8, only ``"`` and ``\\`` escaped (nothing else: no
    ``\\uXXXX``, control characters as they are), the buffer flushed as a blob whenever the
    next piece (a quote, a name or the run of it before an escape, a colon, a comma) does not
    fit. Blobs therefore end between pieces, and split a character only inside a piece longer
    than 4096 bytes; clipboard blobs (``_send_clipboard``) do split characters."""
    blobs: list[bytes] = []
    buf = bytearray(b"{")

    def write(data: bytes) -> None:
        nonlocal buf
        while data:
            piece = data[:JSON_BUFFER]
            if len(buf) + len(piece) > JSON_BUFFER:
                blobs.append(bytes(buf))
                buf = bytearray()
            buf += piece
            data = data[len(piece):]

    def write_string(value: str) -> None:
        write(b'"')
        raw = value.encode("utf-8", "surrogateescape")
        start = 0
        for i, byte in enumerate(raw):
            if byte in (0x22, 0x5C):  # '"' and '\\'
                if i != start:
                    write(raw[start:i])
                write(b"\\")
                start = i
        if start != len(raw):
            write(raw[start:])
        write(b'"')

    for n, (name, mimetype) in enumerate(listing.items()):
        if n:
            write(b",")
        write_string(name)
        write(b":")
        write_string(mimetype)
    write(b"}")
    if buf:
        blobs.append(bytes(buf))
    return blobs


class SftpFileStream(OutboundStream):
    """A file downloaded through SFTP, read as guacd reads it: one ``libssh2_sftp_read`` of
    4096 bytes per client ack, with libssh2 1.9.0's read-ahead (``sftp_read`` in its
    src/sftp.c): a call that finds nothing buffered asks for ``buffer_size*4`` bytes in one
    ``FXP_READ`` (16 KiB here: ``size = count``, at least ``buffer_size``, at most
    ``MAX_SFTP_READ_SIZE``), waits for that answer (guacd's SFTP session is blocking), returns
    the first 4096 bytes and keeps the rest (``data_left``) for the next three calls, which
    return at once. So one SFTP round trip per four blobs, not per blob; a short read is kept
    as it came, an empty one is the end of the file (``FX_EOF``)."""

    def __init__(self, conn, index, handle, on_done=None, fail_after: int | None = None) -> None:
        super().__init__(conn, index, on_done)
        self.handle = handle
        self.ahead = b""  # libssh2's data_left
        self.fail_after = fail_after  # FAIL_READ (the test knob), None for this file

    async def next_block(self) -> bytes:
        if self.fail_after is not None and self.sent >= self.fail_after:
            raise OSError(f"read failed on purpose after {self.sent} bytes "
                          f"({FAIL_READ_AFTER_ENV})")
        if not self.ahead:
            self.ahead = await self.handle.read(SFTP_READ_AHEAD)
        block, self.ahead = self.ahead[:SFTP_BLOCK], self.ahead[SFTP_BLOCK:]
        return block

    async def close_source(self) -> None:
        with contextlib.suppress(Exception):
            await self.handle.close()


class Upload:
    def __init__(self, path: str, handle, via: str) -> None:
        self.path = path
        self.handle = handle
        self.size = 0
        self.via = via
        self.failed = False


class SftpFilesystem:
    def __init__(self, conn: "Connection", sftp, root: str, upload_dir: str,
                 disable_download: bool, disable_upload: bool) -> None:
        self.conn = conn
        self.sftp = sftp
        self.root = root
        self.upload_dir = upload_dir
        self.disable_download = disable_download
        self.disable_upload = disable_upload
        self.index = 0  # the connection's only object

    @classmethod
    async def open(cls, conn: "Connection", ssh_conn, root: str | None,
                   upload_dir: str | None, disable_download: bool, disable_upload: bool):
        sftp = await ssh_conn.start_sftp_client()
        home = await sftp.realpath(".")
        root = posixpath.normpath(root) if root else "/"
        if upload_dir:
            if not upload_dir.startswith("/"):
                upload_dir = posixpath.join(home, upload_dir)
        else:
            upload_dir = home
        fs = cls(conn, sftp, root, posixpath.normpath(upload_dir), disable_download,
                 disable_upload)
        conn.send("filesystem", fs.index, root)
        conn.event("filesystem", object=fs.index, root=root, upload_dir=fs.upload_dir)
        return fs

    def translate(self, name: str) -> str | None:
        """Object-relative absolute name -> real path under root, or None if it escapes."""
        if not name.startswith("/"):
            name = "/" + name
        rel = posixpath.normpath(name)
        if rel.startswith("//"):
            rel = rel[1:]
        if ".." in rel.split("/"):
            return None
        return posixpath.normpath(self.root.rstrip("/") + rel) if rel != "/" else self.root

    async def get(self, name: str) -> None:
        import asyncssh

        conn = self.conn
        path = self.translate(name)
        if path is None:
            conn.event("get_failed", name=name, error="path escapes the filesystem root")
            return
        try:
            attrs = await self.sftp.stat(path)
            if stat.S_ISDIR(attrs.permissions or 0):
                listing: dict[str, str] = {}
                for entry in await self.sftp.readdir(path):
                    if entry.filename in (".", ".."):
                        continue
                    mode = entry.attrs.permissions or 0
                    if stat.S_ISLNK(mode):
                        with contextlib.suppress(asyncssh.SFTPError):
                            mode = (await self.sftp.stat(posixpath.join(path, entry.filename))
                                    ).permissions or 0
                    full = name.rstrip("/") + "/" + entry.filename
                    listing[full] = (STREAM_INDEX_MIMETYPE if stat.S_ISDIR(mode)
                                     else "application/octet-stream")
                index = conn.alloc_stream()
                conn.out_streams[index] = BlobsStream(
                    conn, index, guacd_json_blobs(listing),
                    on_done=lambda ok, n: conn.event("listing", name=name, path=path,
                                                     entries=len(listing), complete=ok))
                conn.send("body", self.index, index, STREAM_INDEX_MIMETYPE, name)
            else:
                if self.disable_download:
                    conn.event("get_failed", name=name, error="download disabled")
                    return
                handle = await self.sftp.open(path, "rb")
                index = conn.alloc_stream()
                conn.out_streams[index] = SftpFileStream(
                    conn, index, handle,
                    on_done=lambda ok, n: conn.event("download", name=name, path=path,
                                                     size=n, complete=ok),
                    fail_after=FAIL_READ.after_for(path) if FAIL_READ else None)
                conn.send("body", self.index, index, "application/octet-stream", name)
        except asyncssh.SFTPError as e:
            conn.event("get_failed", name=name, path=path, error=str(e))

    async def begin_upload(self, stream: int, mimetype: str, path: str, via: str) -> None:
        import asyncssh

        conn = self.conn
        if self.disable_upload:
            conn.send("ack", stream, "SFTP: Upload disabled", CLIENT_FORBIDDEN)
            conn.event("upload_failed", path=path, error="upload disabled")
            return
        try:
            handle = await self.sftp.open(
                path, "wb", attrs=asyncssh.SFTPAttrs(permissions=0o600))
        except asyncssh.SFTPError as e:
            conn.send("ack", stream, "SFTP: Open failed", sftp_status(e))
            conn.event("upload_failed", path=path, error=str(e))
            return
        conn.in_streams[stream] = Upload(path, handle, via)
        conn.send("ack", stream, "SFTP: File opened", SUCCESS)

    async def file(self, stream: int, mimetype: str, filename: str) -> None:
        if not filename or "/" in filename or "\\" in filename or filename in (".", ".."):
            self.conn.send("ack", stream, "SFTP: Illegal filename", CLIENT_BAD_REQUEST)
            self.conn.event("upload_failed", filename=filename, error="invalid filename")
            return
        await self.begin_upload(stream, mimetype, posixpath.join(self.upload_dir, filename),
                                "file")

    async def put(self, stream: int, mimetype: str, name: str) -> None:
        path = self.translate(name)
        if path is None or path == self.root:
            self.conn.send("ack", stream, "SFTP: Invalid path", CLIENT_BAD_REQUEST)
            self.conn.event("upload_failed", name=name, error="invalid path")
            return
        await self.begin_upload(stream, mimetype, path, "put")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sftp.exit()


async def ssh_connect(host: str, port: int, username: str, password: str | None,
                      private_key: str | None, passphrase: str | None, host_key: str | None,
                      timeout: float, keepalive: int = 0):
    """An asyncssh client connection, raising UpstreamError with a guacd-like status."""
    import asyncssh

    known_hosts = None
    if host_key:
        tokens = host_key.split()
        key = None
        for i in range(len(tokens) - 1):
            with contextlib.suppress(Exception):
                key = asyncssh.import_public_key(f"{tokens[i]} {tokens[i + 1]}")
                break
        if key is None:
            raise UpstreamError("Unable to parse the given host key.", CLIENT_BAD_REQUEST)
        known_hosts = ([key], [], [])
    client_keys: list | None = None
    if private_key:
        try:
            client_keys = [asyncssh.import_private_key(private_key, passphrase or None)]
        except (asyncssh.KeyImportError, ValueError) as e:
            raise UpstreamError(f"Auth key import failed: {e}", CLIENT_UNAUTHORIZED) from None
    # Two steps, as guacd 1.3.0's guac_common_ssh_create_session (src/common-ssh/ssh.c): a TCP
    # connect that fails is an unreachable server (UPSTREAM_NOT_FOUND); once connected, a
    # handshake that fails (the server closes, or is not SSH) is "SSH handshake failed."
    # (UPSTREAM_ERROR).
    try:
        sock = await wait_for(tcp_connect(host, port), timeout)
    except asyncio.TimeoutError:
        raise UpstreamError("Timed out connecting to SSH server.", UPSTREAM_TIMEOUT) from None
    except OSError as e:
        raise UpstreamError(f"Unable to connect to SSH server: {e}", UPSTREAM_NOT_FOUND) from None
    try:
        return await wait_for(asyncssh.connect(
            host, port, sock=sock, username=username, password=password or None,
            client_keys=client_keys, known_hosts=known_hosts, agent_path=None,
            config=None, keepalive_interval=keepalive or 0,
        ), timeout)
    except asyncio.TimeoutError:
        sock.close()
        raise UpstreamError("Timed out connecting to SSH server.", UPSTREAM_TIMEOUT) from None
    except asyncssh.PermissionDenied:
        raise UpstreamError("SSH authentication failed.", CLIENT_UNAUTHORIZED) from None
    except asyncssh.HostKeyNotVerifiable:
        raise UpstreamError("Host key did not match.", UPSTREAM_ERROR) from None
    except (OSError, asyncssh.Error):
        sock.close()
        raise UpstreamError("SSH handshake failed.", UPSTREAM_ERROR) from None


async def tcp_connect(host: str, port: int) -> socket.socket:
    """A connected socket to the first of `host`'s addresses that accepts, as guacd tries them."""
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for family, kind, proto, _, address in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            return sock
        except OSError as e:
            sock.close()
            last = e
    raise last or OSError(f"no address for {host}")


class UpstreamError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------------------------
# Sessions


class Session:
    protocol = ""

    def __init__(self, conn: "Connection", params: dict[str, str]) -> None:
        self.conn = conn
        self.params = params
        self.display = Display(conn)
        self.mods = Modifiers()
        self.typed = TypedText(conn)
        self.fs: SftpFilesystem | None = None
        self.tasks: list[asyncio.Task] = []
        self.keys = 0
        self.mouse_events = 0
        self.mouse_mask = 0
        self.read_only = truthy(params.get("read-only"))

    async def start(self) -> None:
        raise NotImplementedError

    async def key(self, keysym: int, pressed: bool) -> None:
        raise NotImplementedError

    async def mouse(self, x: int, y: int, mask: int) -> None:
        self.mouse_events += 1
        if mask != self.mouse_mask:
            self.conn.event("mouse", x=x, y=y, mask=mask)
            self.mouse_mask = mask

    async def resize(self, width: int, height: int) -> None:
        pass

    async def clipboard(self, mimetype: str, data: bytes) -> None:
        self.conn.event("clipboard", direction="to-remote", mimetype=mimetype, length=len(data),
                        text=data.decode("utf-8", "replace"), valid_utf8=utf8_valid(data),
                        delivered=False)

    def spawn(self, coro) -> None:
        self.tasks.append(asyncio.create_task(self._guard(coro)))

    async def _guard(self, coro) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except UpstreamError as e:
            await self.conn.abort(str(e), e.status)
        except Exception as e:  # noqa: BLE001
            await self.conn.abort(f"Internal error: {type(e).__name__}: {e}", SERVER_ERROR)

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(BaseException):
                await t
        if self.fs:
            await self.fs.close()

    def counters(self) -> dict[str, object]:
        return {"keys": self.keys, "mouse": self.mouse_events, "frames": self.display.frames}


# -- SSH ---------------------------------------------------------------------------------------

# guacd's terminal palette (src/terminal/palette.c), and the colour schemes' defaults.
PALETTE = [
    (0x00, 0x00, 0x00), (0x99, 0x3E, 0x3E), (0x3E, 0x99, 0x3E), (0x99, 0x99, 0x3E),
    (0x3E, 0x3E, 0x99), (0x99, 0x3E, 0x99), (0x3E, 0x99, 0x99), (0x99, 0x99, 0x99),
    (0x3E, 0x3E, 0x3E), (0xFF, 0x67, 0x67), (0x67, 0xFF, 0x67), (0xFF, 0xFF, 0x67),
    (0x67, 0x67, 0xFF), (0xFF, 0x67, 0xFF), (0x67, 0xFF, 0xFF), (0xFF, 0xFF, 0xFF),
]
COLOR_NAMES = ["black", "red", "green", "brown", "blue", "magenta", "cyan", "white"]
SCHEMES = {
    "gray-black": ((0x99, 0x99, 0x99), (0, 0, 0)),
    "black-white": ((0, 0, 0), (0xFF, 0xFF, 0xFF)),
    "white-black": ((0xFF, 0xFF, 0xFF), (0, 0, 0)),
    "green-black": ((0x00, 0xFF, 0x00), (0, 0, 0)),
}


class TerminalRenderer:
    def __init__(self, font_px: int, scheme: str) -> None:
        from PIL import ImageFont

        self.font = ImageFont.truetype(f"{FONT_DIR}/DejaVuSansMono.ttf", font_px)
        self.bold = ImageFont.truetype(f"{FONT_DIR}/DejaVuSansMono-Bold.ttf", font_px)
        ascent, descent = self.font.getmetrics()
        self.cw = max(1, round(self.font.getlength("M")))
        self.ch = max(1, ascent + descent)
        self.fg, self.bg = SCHEMES.get((scheme or "").strip(), SCHEMES["gray-black"])

    def color(self, name: str, default, bold: bool = False):
        if name == "default":
            return default
        if name in COLOR_NAMES:
            return PALETTE[COLOR_NAMES.index(name) + (8 if bold else 0)]
        if name.startswith("bright") and name[6:] in COLOR_NAMES:
            return PALETTE[COLOR_NAMES.index(name[6:]) + 8]
        if len(name) == 6:
            with contextlib.suppress(ValueError):
                return (int(name[0:2], 16), int(name[2:4], 16), int(name[4:6], 16))
        return default

    def render(self, screen, width: int, height: int):
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (width, height), self.bg)
        draw = ImageDraw.Draw(img)
        cw, ch = self.cw, self.ch
        cur = screen.cursor
        for y in range(screen.lines):
            row = screen.buffer[y]
            x = 0
            while x < screen.columns:
                c = row[x]
                key = (c.fg, c.bg, c.bold, c.reverse, c.underscore)
                start = x
                first = c.data or " "  # "" is the right half of a wide character
                text = [first]
                single = len(first) == 1 and not _wide(first)
                x += 1
                if single:
                    while x < screen.columns:
                        n = row[x]
                        if (n.fg, n.bg, n.bold, n.reverse, n.underscore) != key:
                            break
                        d = n.data or " "
                        if len(d) != 1 or _wide(d):
                            break
                        text.append(d)
                        x += 1
                fg = self.color(c.fg, self.fg, c.bold)
                bg = self.color(c.bg, self.bg)
                if c.reverse:
                    fg, bg = bg, fg
                x0, y0 = start * cw, y * ch
                x1 = x0 + cw * (len(text) if single else 2) - 1
                if bg != self.bg:
                    draw.rectangle((x0, y0, x1, y0 + ch - 1), fill=bg)
                s = "".join(text)
                if s.strip():
                    draw.text((x0, y0), s, font=self.bold if c.bold else self.font, fill=fg)
                if c.underscore:
                    draw.line((x0, y0 + ch - 2, x1, y0 + ch - 2), fill=fg)
        if not cur.hidden and 0 <= cur.y < screen.lines and 0 <= cur.x < screen.columns:
            x0, y0 = cur.x * cw, cur.y * ch
            box = (x0, y0, x0 + cw - 1, y0 + ch - 1)
            cell = img.crop(box)
            from PIL import ImageOps

            img.paste(ImageOps.invert(cell), box[:2])
        return img


def _wide(s: str) -> bool:
    import unicodedata

    return bool(s) and unicodedata.east_asian_width(s[0]) in ("W", "F")


SSH_KEYS = {
    0xFF09: b"\t", 0xFF0D: b"\r", 0xFF8D: b"\r", 0xFF1B: b"\x1b", 0xFFFF: b"\x1b[3~",
    0xFF9F: b"\x1b[3~", 0xFF50: b"\x1b[1~", 0xFF95: b"\x1b[1~", 0xFF57: b"\x1b[4~",
    0xFF9C: b"\x1b[4~", 0xFF55: b"\x1b[5~", 0xFF9A: b"\x1b[5~", 0xFF56: b"\x1b[6~",
    0xFF9B: b"\x1b[6~", 0xFF63: b"\x1b[2~", 0xFF9E: b"\x1b[2~",
    0xFFBE: b"\x1b[[A", 0xFFBF: b"\x1b[[B", 0xFFC0: b"\x1b[[C", 0xFFC1: b"\x1b[[D",
    0xFFC2: b"\x1b[[E", 0xFFC3: b"\x1b[17~", 0xFFC4: b"\x1b[18~", 0xFFC5: b"\x1b[19~",
    0xFFC6: b"\x1b[20~", 0xFFC7: b"\x1b[21~", 0xFFC8: b"\x1b[23~", 0xFFC9: b"\x1b[24~",
}
ARROWS = {0xFF51: "D", 0xFF52: "A", 0xFF53: "C", 0xFF54: "B",
          0xFF96: "D", 0xFF97: "A", 0xFF98: "C", 0xFF99: "B"}
CTRL_SPECIAL = {"@": 0, " ": 0, "2": 0, "[": 27, "3": 27, "\\": 28, "4": 28, "]": 29, "5": 29,
                "^": 30, "6": 30, "_": 31, "7": 31, "-": 31, "?": 127, "8": 127}


class SshSession(Session):
    protocol = "ssh"

    def __init__(self, conn, params) -> None:
        super().__init__(conn, params)
        self.ssh = None
        self.process = None
        self.screen = None
        self.stream = None
        self.renderer = None
        self.dirty = asyncio.Event()
        self.backspace = bytes([int_or(params.get("backspace"), 127) & 0xFF])

    async def start(self) -> None:
        import pyte

        p = self.params
        info = self.conn.info
        host = p.get("hostname") or ""
        port = int_or(p.get("port"), 22)
        username = p.get("username") or ""
        if not host:
            raise UpstreamError("No hostname given.", CLIENT_BAD_REQUEST)
        if not username or not (p.get("password") or p.get("private-key")):
            raise UpstreamError("This test double needs a username and a password or private key "
                                "(guacd would prompt on the terminal).", CLIENT_UNAUTHORIZED)
        font_pt = int_or(p.get("font-size"), 12) or 12
        font_px = max(6, round(font_pt * info["dpi"] / 72))
        self.renderer = TerminalRenderer(font_px, p.get("color-scheme") or "")
        self.ssh = await ssh_connect(
            host, port, username, p.get("password"), p.get("private-key"),
            p.get("passphrase"), p.get("host-key"), float(int_or(p.get("timeout"), 10) or 10),
            int_or(p.get("server-alive-interval"), 0))
        width, height = info["width"], info["height"]
        cols, rows = self._grid(width, height)
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.process = await self.ssh.create_process(
            p.get("command") or None, term_type=p.get("terminal-type") or "linux",
            term_size=(cols, rows, width, height), encoding=None)
        self.conn.event("upstream_connected", protocol="ssh", host=host, port=port,
                        username=username, columns=cols, rows=rows, width=width, height=height)
        self.display.set_size(width, height)
        await self.display.frame(self.renderer.render(self.screen, width, height))
        if truthy(p.get("enable-sftp")):
            try:
                self.fs = await SftpFilesystem.open(
                    self.conn, self.ssh, p.get("sftp-root-directory") or "/",
                    p.get("sftp-root-directory") or None,
                    truthy(p.get("sftp-disable-download")), truthy(p.get("sftp-disable-upload")))
            except Exception as e:  # noqa: BLE001 - guacd keeps the terminal without SFTP
                self.conn.event("sftp_failed", error=str(e))
        self.spawn(self._read())
        self.spawn(self._render_loop())

    def _grid(self, width: int, height: int) -> tuple[int, int]:
        return (max(1, width // self.renderer.cw), max(1, height // self.renderer.ch))

    async def _read(self) -> None:
        while True:
            data = await self.process.stdout.read(65536)
            if not data:
                break
            self.stream.feed(data)
            self.dirty.set()
        # The shell ended: show the last screen, then disconnect as guacd does.
        await asyncio.sleep(SSH_SETTLE)
        await self.display.frame(self.renderer.render(self.screen, self.display.width,
                                                      self.display.height))
        await self.conn.end_session("ssh session ended")

    async def _render_loop(self) -> None:
        while True:
            await self.dirty.wait()
            await asyncio.sleep(SSH_SETTLE)
            self.dirty.clear()
            await self.display.frame(self.renderer.render(self.screen, self.display.width,
                                                          self.display.height))

    def _key_bytes(self, keysym: int) -> bytes | None:
        if keysym == 0xFF08:
            return self.backspace
        if keysym in ARROWS:
            app_mode = (1 << 5) in self.screen.mode  # DECCKM, pyte stores private modes << 5
            return ("\x1bO" if app_mode else "\x1b[").encode() + ARROWS[keysym].encode()
        if keysym in SSH_KEYS:
            out = SSH_KEYS[keysym]
        else:
            ch = keysym_to_char(keysym)
            if ch is None:
                return None
            if self.mods.has("ctrl"):
                if ch.isascii() and ch.isalpha():
                    ch = chr(ord(ch.upper()) & 0x1F)
                elif ch in CTRL_SPECIAL:
                    ch = chr(CTRL_SPECIAL[ch])
            out = ch.encode("utf-8")
        if self.mods.has("alt"):
            out = b"\x1b" + out
        return out

    async def key(self, keysym: int, pressed: bool) -> None:
        if self.mods.update(keysym, pressed) or not pressed:
            return
        self.keys += 1
        self.typed.key(keysym, self.mods)
        if self.read_only or self.process is None:
            return
        data = self._key_bytes(keysym)
        if data:
            self.process.stdin.write(data)

    async def resize(self, width: int, height: int) -> None:
        if self.process is None or width <= 0 or height <= 0:
            return
        cols, rows = self._grid(width, height)
        self.screen.resize(rows, cols)
        with contextlib.suppress(Exception):
            self.process.change_terminal_size(cols, rows, width, height)
        self.conn.event("resize", width=width, height=height, columns=cols, rows=rows)
        self.display.set_size(width, height)
        await self.display.frame(self.renderer.render(self.screen, width, height))

    def counters(self) -> dict[str, object]:
        # The terminal's last text, for the tests (pyte's view of the screen, blank lines cut).
        counters = super().counters()
        if self.screen is not None:
            counters["screen"] = [line.rstrip() for line in self.screen.display if line.strip()]
        return counters

    async def close(self) -> None:
        await super().close()
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.process.close()
        if self.ssh is not None:
            self.ssh.close()
            with contextlib.suppress(Exception):
                await wait_for(self.ssh.wait_closed(), 2)


# -- VNC ---------------------------------------------------------------------------------------


def vnc_des_response(password: str, challenge: bytes) -> bytes:
    from Crypto.Cipher import DES

    key = password.encode("latin-1", "replace")[:8].ljust(8, b"\0")
    # RFB's DES key: each byte with its bits mirrored.
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in key)
    return DES.new(key, DES.MODE_ECB).encrypt(challenge)


class VncSession(Session):
    protocol = "vnc"

    ENC_RAW, ENC_COPYRECT = 0, 1
    ENC_DESKTOP_SIZE, ENC_EXT_DESKTOP_SIZE = -223, -308

    def __init__(self, conn, params) -> None:
        super().__init__(conn, params)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.fb = None
        self.width = self.height = 0
        self.screens: list[tuple[int, int, int, int, int, int]] | None = None
        self.resize_to: tuple[int, int] | None = None
        self.resize_task: asyncio.Task | None = None
        self.name = ""
        self.rfb_ready = False  # no input may be sent before the RFB handshake is done
        self.need_full = True

    async def start(self) -> None:
        from PIL import Image

        p = self.params
        host = p.get("hostname") or ""
        port = int_or(p.get("port"), 5900)
        if not host:
            raise UpstreamError("No hostname given.", CLIENT_BAD_REQUEST)
        try:
            self.reader, self.writer = await wait_for(
                asyncio.open_connection(host, port), 10)
        except (OSError, asyncio.TimeoutError):
            raise UpstreamError("Unable to connect to VNC server.", UPSTREAM_NOT_FOUND) from None
        try:
            await wait_for(self._rfb_handshake(p.get("password") or ""), 15)
        except asyncio.TimeoutError:
            raise UpstreamError("VNC server did not answer in time.", UPSTREAM_TIMEOUT) from None
        except (asyncio.IncompleteReadError, ConnectionError):
            raise UpstreamError("VNC server closed the connection.", UPSTREAM_ERROR) from None
        self.fb = Image.new("RGB", (self.width, self.height))
        self.rfb_ready = True
        self.conn.event("upstream_connected", protocol="vnc", host=host, port=port,
                        width=self.width, height=self.height, desktop=self.name)
        if truthy(p.get("enable-sftp")):
            # As guac_vnc_client_thread (src/protocols/vnc/vnc.c, 1.3.0 to 1.6.0): SFTP after
            # the VNC server, before the display exists; any failure aborts the whole session.
            try:
                sftp_conn = await ssh_connect(
                    p.get("sftp-hostname") or host, int_or(p.get("sftp-port"), 22),
                    p.get("sftp-username") or "", p.get("sftp-password"),
                    p.get("sftp-private-key"), p.get("sftp-passphrase"),
                    p.get("sftp-host-key"), float(int_or(p.get("sftp-timeout"), 10) or 10),
                    int_or(p.get("sftp-server-alive-interval"), 0))
            except UpstreamError as e:
                self.conn.event("sftp_failed", error=str(e))
                raise
            self._sftp_conn = sftp_conn
            try:
                self.fs = await SftpFilesystem.open(
                    self.conn, sftp_conn, p.get("sftp-root-directory") or "/",
                    p.get("sftp-directory") or p.get("sftp-root-directory") or None,
                    truthy(p.get("sftp-disable-download")), truthy(p.get("sftp-disable-upload")))
            except Exception as e:  # noqa: BLE001 - guacd: "SFTP connection failed."
                self.conn.event("sftp_failed", error=str(e))
                raise UpstreamError("SFTP connection failed.", UPSTREAM_ERROR) from None
        self.display.set_size(self.width, self.height)
        self.spawn(self._run())

    async def _rfb_handshake(self, password: str) -> None:
        r, w = self.reader, self.writer
        banner = await r.readexactly(12)
        if not banner.startswith(b"RFB "):
            raise UpstreamError("Not a VNC server.", UPSTREAM_ERROR)
        major, minor = int(banner[4:7]), int(banner[8:11])
        minor = 8 if (major, minor) >= (3, 8) else (7 if (major, minor) >= (3, 7) else 3)
        w.write(b"RFB 003.%03d\n" % minor)
        if minor == 3:
            (sec,) = struct.unpack(">I", await r.readexactly(4))
            if sec == 0:
                raise UpstreamError("VNC server refused: " + await self._reason(), UPSTREAM_ERROR)
        else:
            (count,) = struct.unpack(">B", await r.readexactly(1))
            if count == 0:
                raise UpstreamError("VNC server refused: " + await self._reason(), UPSTREAM_ERROR)
            offered = list(await r.readexactly(count))
            if 2 in offered and (password or 1 not in offered):
                sec = 2
            elif 1 in offered:
                sec = 1
            else:
                raise UpstreamError(f"No supported VNC security type in {offered}.",
                                    UPSTREAM_ERROR)
            w.write(bytes([sec]))
        if sec == 2:
            challenge = await r.readexactly(16)
            w.write(vnc_des_response(password, challenge))
        if sec == 2 or minor == 8:
            (result,) = struct.unpack(">I", await r.readexactly(4))
            if result != 0:
                reason = await self._reason() if minor == 8 else ""
                raise UpstreamError(f"VNC authentication failed{': ' + reason if reason else ''}",
                                    CLIENT_UNAUTHORIZED)
        w.write(b"\x01")  # ClientInit: shared
        head = await r.readexactly(24)
        self.width, self.height = struct.unpack(">HH", head[:4])
        (name_len,) = struct.unpack(">I", head[20:24])
        self.name = (await r.readexactly(name_len)).decode("utf-8", "replace")
        # SetPixelFormat: 32 bpp, depth 24, little-endian, true colour, R<<16 G<<8 B.
        w.write(struct.pack(">B3xBBBBHHHBBB3x", 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0))
        encodings = [self.ENC_COPYRECT, self.ENC_RAW, self.ENC_EXT_DESKTOP_SIZE,
                     self.ENC_DESKTOP_SIZE]
        w.write(struct.pack(">BxH", 2, len(encodings))
                + b"".join(struct.pack(">i", e) for e in encodings))
        await w.drain()

    async def _reason(self) -> str:
        (n,) = struct.unpack(">I", await self.reader.readexactly(4))
        return (await self.reader.readexactly(n)).decode("utf-8", "replace")

    def _request(self, incremental: bool) -> None:
        self.writer.write(struct.pack(">BBHHHH", 3, 1 if incremental else 0, 0, 0,
                                      self.width, self.height))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._request(False)
            self.need_full = False
            last = 0.0
            while True:
                (mtype,) = await self.reader.readexactly(1)
                if mtype == 0:
                    rects = await self._update()
                    if rects or self.display.prev is None:
                        await self.display.frame(self.fb, rects or None)
                    delay = VNC_FRAME_INTERVAL - (loop.time() - last)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    last = loop.time()
                    self._request(not self.need_full)
                    self.need_full = False
                    await self.writer.drain()
                elif mtype == 1:  # SetColourMapEntries
                    _, _, n = struct.unpack(">BHH", await self.reader.readexactly(5))
                    await self.reader.readexactly(6 * n)
                elif mtype == 2:  # Bell
                    pass
                elif mtype == 3:  # ServerCutText
                    await self.reader.readexactly(3)
                    (n,) = struct.unpack(">i", await self.reader.readexactly(4))
                    text = (await self.reader.readexactly(abs(n))).decode("latin-1")
                    if n >= 0 and not truthy(self.params.get("disable-copy")):
                        self._send_clipboard(text)
                else:
                    raise UpstreamError(f"Unknown RFB message type {mtype}.", UPSTREAM_ERROR)
        except (asyncio.IncompleteReadError, ConnectionError):
            raise UpstreamError("Connection closed.", UPSTREAM_UNAVAILABLE) from None

    async def _update(self) -> list[tuple[int, int, int, int]]:
        from PIL import Image

        r = self.reader
        _, n = struct.unpack(">BH", await r.readexactly(3))
        rects: list[tuple[int, int, int, int]] = []
        for _ in range(n):
            x, y, w, h, enc = struct.unpack(">HHHHi", await r.readexactly(12))
            if enc == self.ENC_RAW:
                data = await r.readexactly(w * h * 4)
                if w and h:
                    self.fb.paste(Image.frombuffer("RGB", (w, h), data, "raw", "BGRX", 0, 1),
                                  (x, y))
                    rects.append((x, y, w, h))
            elif enc == self.ENC_COPYRECT:
                sx, sy = struct.unpack(">HH", await r.readexactly(4))
                self.fb.paste(self.fb.crop((sx, sy, sx + w, sy + h)), (x, y))
                rects.append((x, y, w, h))
            elif enc == self.ENC_DESKTOP_SIZE:
                self._resize_fb(w, h)
                rects = []
            elif enc == self.ENC_EXT_DESKTOP_SIZE:
                count = (await r.readexactly(4))[0]
                screens = [struct.unpack(">IHHHHI", await r.readexactly(16))
                           for _ in range(count)]
                if x == 1 and y != 0:
                    self.conn.event("resize_refused", status=y, width=w, height=h)
                self.screens = screens
                if (w, h) != (self.width, self.height):
                    self._resize_fb(w, h)
                    rects = []
            else:
                raise UpstreamError(f"Unexpected RFB encoding {enc}.", UPSTREAM_ERROR)
        return rects

    def _resize_fb(self, w: int, h: int) -> None:
        from PIL import Image

        old = self.fb
        self.fb = Image.new("RGB", (w, h))
        self.fb.paste(old, (0, 0))
        self.width, self.height = w, h
        self.conn.event("resize", width=w, height=h, source="vnc-server")
        self.display.set_size(w, h)
        self.need_full = True

    def _send_clipboard(self, text: str) -> None:
        self.conn.event("clipboard", direction="to-client", length=len(text), text=text)
        # Raw UTF-8 in 4096-byte blocks cut at byte boundaries, as guac_common_clipboard_send
        # (src/common/clipboard.c) does: a character can straddle two blobs.
        data = text.encode("utf-8")
        stream = self.conn.alloc_stream()
        self.conn.send("clipboard", stream, "text/plain")
        for i in range(0, len(data), CLIPBOARD_BLOCK):
            self.conn.send("blob", stream, base64.b64encode(data[i:i + CLIPBOARD_BLOCK]).decode())
        self.conn.send("end", stream)
        self.conn.free_stream(stream)

    async def key(self, keysym: int, pressed: bool) -> None:
        self.mods.update(keysym, pressed)
        if pressed:
            self.keys += 1
            self.typed.key(keysym, self.mods)
        if self.read_only or not self.rfb_ready:
            return
        self.writer.write(struct.pack(">BBxxI", 4, 1 if pressed else 0, keysym & 0xFFFFFFFF))

    async def mouse(self, x: int, y: int, mask: int) -> None:
        await super().mouse(x, y, mask)
        if self.read_only or not self.rfb_ready:
            return
        x = min(max(x, 0), max(self.width - 1, 0))
        y = min(max(y, 0), max(self.height - 1, 0))
        self.writer.write(struct.pack(">BBHH", 5, mask & 0xFF, x, y))

    async def resize(self, width: int, height: int) -> None:
        if truthy(self.params.get("disable-display-resize")) or not self.rfb_ready:
            return
        if width <= 0 or height <= 0 or self.screens is None:
            return  # the server does not do ExtendedDesktopSize: keep its size
        self.resize_to = (width, height)
        if self.resize_task is None or self.resize_task.done():
            self.resize_task = asyncio.create_task(self._apply_resize())
            self.tasks.append(self.resize_task)

    async def _apply_resize(self) -> None:
        await asyncio.sleep(0.2)  # let a burst of size instructions settle
        if self.resize_to is None or self.writer is None:
            return
        w, h = self.resize_to
        self.resize_to = None
        if (w, h) == (self.width, self.height):
            return
        sid, _, _, _, _, flags = (self.screens or [(0, 0, 0, 0, 0, 0)])[0]
        self.writer.write(struct.pack(">BxHHBx", 251, w, h, 1)
                          + struct.pack(">IHHHHI", sid, 0, 0, w, h, flags))
        self.conn.event("resize_requested", width=w, height=h)

    async def clipboard(self, mimetype: str, data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        valid = utf8_valid(data)
        delivered = False
        if (self.rfb_ready and mimetype.startswith("text/")
                and not truthy(self.params.get("disable-paste"))):
            latin = text.encode("latin-1", "replace")
            self.writer.write(struct.pack(">B3xI", 6, len(latin)) + latin)
            delivered = True
        self.conn.event("clipboard", direction="to-remote", mimetype=mimetype,
                        length=len(text), text=text, valid_utf8=valid, delivered=delivered)

    async def close(self) -> None:
        await super().close()
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await wait_for(self.writer.wait_closed(), 2)
        sftp_conn = getattr(self, "_sftp_conn", None)
        if sftp_conn is not None:
            sftp_conn.close()


SESSIONS = {"ssh": SshSession, "vnc": VncSession}


# ----------------------------------------------------------------------------------------------
# One client connection


class ClipboardIn:
    def __init__(self, mimetype: str) -> None:
        self.mimetype = mimetype
        self.data = bytearray()


class Connection:
    def __init__(self, peer: "Peer", reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.peer = peer
        self.reader = reader
        self.writer = writer
        self.parser = Parser()
        self.id: str | None = None
        self.label = f"#{peer.next_seq()}"
        self.closed = False
        self.session: Session | None = None
        self.info = {"width": 1024, "height": 768, "dpi": 96}
        self.free_streams: list[int] = []
        self.next_stream = 0
        self.out_streams: dict[int, OutboundStream] = {}
        self.in_streams: dict[int, object] = {}
        self.last_write = time.monotonic()
        self.last_sync_sent: int | None = None
        self.last_sync_acked: int | None = None
        self.sync_acked = asyncio.Event()
        self.sync_acked.set()
        self.syncs_acked = 0
        self.done = asyncio.Event()
        self.close_reason = ""

    # -- output
    def event(self, _event: str, **fields: object) -> None:
        self.peer.events.write(_event, self.id or self.label, **fields)

    def send(self, *elements: object) -> None:
        if self.closed or self.writer.is_closing():
            return
        self.writer.write(encode(*elements))
        self.last_write = time.monotonic()

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.writer.drain()

    def send_sync(self) -> None:
        ts = now_ms()
        if self.last_sync_sent is not None and ts <= self.last_sync_sent:
            ts = self.last_sync_sent + 1
        self.last_sync_sent = ts
        self.sync_acked.clear()
        self.send("sync", ts)

    async def wait_sync_ack(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await wait_for(self.sync_acked.wait(), SYNC_WAIT)

    def alloc_stream(self) -> int:
        if self.free_streams:
            return self.free_streams.pop()
        self.next_stream += 1
        return self.next_stream - 1

    def free_stream(self, index: int) -> None:
        self.free_streams.append(index)

    # -- input
    async def read_instruction(self) -> list[str] | None:
        while not self.parser.ready:
            data = await self.reader.read(65536)
            if not data:
                return None
            self.parser.feed(data)
        return self.parser.ready.popleft()

    async def reject(self, message: str, status: int = CLIENT_BAD_REQUEST) -> None:
        self.event("handshake_failed", reason=message, status=status)
        self.send("error", message, status)
        await self.drain()

    # -- lifecycle
    async def run(self) -> None:
        peername = self.writer.get_extra_info("peername")
        self.event("connection", peer=f"{peername[0]}:{peername[1]}" if peername else None)
        try:
            params = await self.handshake()
            if params is None:
                return
            await self.interactive(params)
        except ProtocolError as e:
            self.event("protocol_error", error=str(e))
            self.send("error", f"Bad instruction: {e}", CLIENT_BAD_REQUEST)
            await self.drain()
            self.close_reason = self.close_reason or f"protocol error: {e}"
        except (ConnectionError, asyncio.IncompleteReadError):
            self.close_reason = self.close_reason or "client connection lost"
        except Exception as e:  # noqa: BLE001 - a bug here must not go unnoticed
            import traceback

            traceback.print_exc()
            self.event("internal_error", error=f"{type(e).__name__}: {e}")
            self.send("error", "Internal error in the guacd test double.", SERVER_ERROR)
            await self.drain()
            self.close_reason = self.close_reason or "internal error"
        finally:
            await self.cleanup()

    async def handshake(self) -> dict[str, str] | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.peer.handshake_timeout

        async def next_instruction() -> list[str] | None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await wait_for(self.read_instruction(), remaining)

        try:
            ins = await next_instruction()
            if ins is None:
                self.close_reason = "closed before select"
                self.event("handshake_failed", reason="connection closed before \"select\"")
                return None
            if ins[0] != "select" or len(ins) != 2:
                await self.reject(
                    f"Expected \"select\" as the first instruction, got \"{ins[0]}\".")
                return None
            protocol = ins[1]
            if protocol.startswith("$"):
                await self.reject(f"Connection \"{protocol}\" does not exist.", RESOURCE_NOT_FOUND)
                return None
            if protocol not in PROTOCOLS or protocol in self.peer.without:
                # guacd cannot load libguac-client-<protocol>: it logs this and the client hears
                # nothing (no args, no error, no close) until the handshake timeout.
                self.event("handshake_failed", protocol=protocol,
                           reason=f"Support for protocol \"{protocol}\" is not installed.")
                self.close_reason = "protocol not installed"
                with contextlib.suppress(asyncio.TimeoutError):
                    while await next_instruction() is not None:
                        pass
                return None
            arg_names = PROTOCOLS[protocol]
            self.send("args", PROTOCOL_VERSION, *arg_names)
            await self.drain()
            seen: dict[str, list[str]] = {}
            while True:
                ins = await next_instruction()
                if ins is None:
                    self.close_reason = "closed during handshake"
                    self.event("handshake_failed", reason="connection closed before \"connect\"")
                    return None
                op, args = ins[0], ins[1:]
                if op == "connect":
                    break
                if op == "size":
                    if len(args) < 2 or not all(a.isdigit() for a in args[:3]):
                        await self.reject(f"Malformed \"size\" instruction: {args}.")
                        return None
                    self.info["width"], self.info["height"] = int(args[0]), int(args[1])
                    if len(args) > 2:
                        self.info["dpi"] = int(args[2]) or 96
                elif op in ("audio", "video", "image", "timezone", "name"):
                    pass
                else:
                    self.event("handshake_ignored", opcode=op)
                    continue
                seen[op] = args
            if len(args) != len(arg_names) + 1:
                await self.reject(
                    f"Incorrect number of connection parameters provided: expected "
                    f"{len(arg_names) + 1}, got {len(args)}.")
                return None
            version = args[0]
            if not version.startswith("VERSION_"):
                await self.reject(f"Bad protocol version \"{version}\" in \"connect\".")
                return None
            params = dict(zip(arg_names, args[1:]))
        except asyncio.TimeoutError:
            # guacd closes silently ("Handshake failed, ... not received.").
            self.close_reason = "handshake timeout"
            self.event("handshake_failed", reason="handshake timeout",
                       seconds=self.peer.handshake_timeout)
            return None
        self.id = "$" + str(uuid.uuid4())
        self.event("handshake", protocol=protocol, version=version, args=redact(params),
                   size=seen.get("size"), audio=seen.get("audio"), video=seen.get("video"),
                   image=seen.get("image"), timezone=(seen.get("timezone") or [None])[0],
                   name=(seen.get("name") or [None])[0], previous=self.label)
        self.protocol = protocol
        return params

    async def interactive(self, params: dict[str, str]) -> None:
        self.event("ready")
        self.send("ready", self.id)
        await self.drain()
        self.session = SESSIONS[self.protocol](self, params)
        keepalive = asyncio.create_task(self._keepalive())
        starter = asyncio.create_task(self._start_session())
        reader = asyncio.create_task(self._input_loop())
        done_wait = asyncio.create_task(self.done.wait())
        try:
            await asyncio.wait({reader, done_wait}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and not reader.cancelled() and reader.exception():
                raise reader.exception()
        finally:
            for t in (keepalive, starter, reader, done_wait):
                t.cancel()
            for t in (keepalive, starter, reader, done_wait):
                with contextlib.suppress(BaseException):
                    await t

    async def _start_session(self) -> None:
        try:
            await self.session.start()
        except UpstreamError as e:
            self.event("upstream_failed", error=str(e), status=e.status)
            await self.abort(str(e), e.status)
        except Exception as e:  # noqa: BLE001
            self.event("upstream_failed", error=f"{type(e).__name__}: {e}", status=SERVER_ERROR)
            await self.abort(f"Internal error: {e}", SERVER_ERROR)

    async def _keepalive(self) -> None:
        while not self.closed:
            await asyncio.sleep(1)
            if time.monotonic() - self.last_write >= KEEPALIVE_INTERVAL:
                self.send("nop")
                await self.drain()

    async def _input_loop(self) -> None:
        while True:
            try:
                ins = await wait_for(self.read_instruction(), self.peer.client_timeout)
            except asyncio.TimeoutError:
                self.event("client_timeout", seconds=self.peer.client_timeout)
                self.close_reason = "client not responding"
                self.send("disconnect")
                await self.drain()
                return
            if ins is None:
                self.close_reason = self.close_reason or "client closed the connection"
                return
            if not await self.dispatch(ins[0], ins[1:]):
                return

    async def dispatch(self, op: str, args: list[str]) -> bool:
        s = self.session
        try:
            if op == "sync" and args:
                self.last_sync_acked = int_or(args[0], 0)
                self.syncs_acked += 1
                if self.last_sync_sent is None or self.last_sync_acked >= self.last_sync_sent:
                    self.sync_acked.set()
            elif op == "mouse" and len(args) >= 3:
                await s.mouse(int(args[0]), int(args[1]), int(args[2]))
            elif op == "key" and len(args) >= 2:
                await s.key(int(args[0]), args[1] == "1")
            elif op == "size" and len(args) >= 2:
                await s.resize(int(args[0]), int(args[1]))
            elif op == "clipboard" and len(args) >= 2:
                self.in_streams[int(args[0])] = ClipboardIn(args[1])
            elif op == "file" and len(args) >= 3:
                if s.fs is None:
                    self.send("ack", args[0], "File transfer unsupported", UNSUPPORTED)
                    self.event("upload_failed", filename=args[2], error="no filesystem")
                else:
                    await s.fs.file(int(args[0]), args[1], args[2])
            elif op == "put" and len(args) >= 4:
                if s.fs is None or args[0] != str(s.fs.index):
                    self.send("ack", args[1], "No such object", RESOURCE_NOT_FOUND)
                else:
                    await s.fs.put(int(args[1]), args[2], args[3])
            elif op == "blob" and len(args) >= 2:
                await self._blob(int(args[0]), args[1])
            elif op == "end" and args:
                await self._end(int(args[0]))
            elif op == "ack" and len(args) >= 3:
                stream = self.out_streams.get(int_or(args[0], -1))
                if stream is not None:
                    await stream.on_ack(args[1], int_or(args[2], SERVER_ERROR))
            elif op == "get" and len(args) >= 2:
                if s.fs is not None and args[0] == str(s.fs.index):
                    await s.fs.get(args[1])
                else:
                    self.event("get_failed", name=args[1], error="no such object")
            elif op == "disconnect":
                self.close_reason = "client disconnect"
                return False
            elif op in ("audio", "argv", "pipe", "img"):
                if args:
                    self.send("ack", args[0], "Unsupported", UNSUPPORTED)
            elif op == "nop":
                pass
            else:
                self.event("ignored", opcode=op)
        except ValueError:
            self.event("ignored", opcode=op, error="malformed arguments")
        await self.drain()
        return True

    async def _blob(self, index: int, b64: str) -> None:
        target = self.in_streams.get(index)
        try:
            data = base64.b64decode(b64, validate=False)
        except ValueError:
            self.send("ack", index, "Bad base64", CLIENT_BAD_REQUEST)
            return
        if isinstance(target, ClipboardIn):
            target.data += data
        elif isinstance(target, Upload):
            # guacd (guac_common_ssh_sftp_blob_handler) writes each blob before it acks it,
            # one ack per blob, and after a failed write goes on writing and acking the next
            # blobs (guacamole-common-js stops sending at the first error ack).
            try:
                await target.handle.write(data, target.size)
                target.size += len(data)
                self.send("ack", index, "SFTP: OK", SUCCESS)
            except Exception as e:  # noqa: BLE001
                if not target.failed:
                    self.event("upload_failed", path=target.path, error=str(e))
                target.failed = True
                self.send("ack", index, "SFTP: Write failed", SERVER_ERROR)
        else:
            self.send("ack", index, "No such stream", RESOURCE_NOT_FOUND)

    async def _end(self, index: int) -> None:
        target = self.in_streams.pop(index, None)
        if isinstance(target, ClipboardIn):
            await self.session.clipboard(target.mimetype, bytes(target.data))
        elif isinstance(target, Upload):
            # guacd (guac_common_ssh_sftp_end_handler) acks the end with the close's result,
            # whatever happened to the writes before.
            try:
                await target.handle.close()
                closed = True
            except Exception as e:  # noqa: BLE001
                closed = False
                self.event("upload_failed", path=target.path, error=f"close: {e}")
            if closed and not target.failed:
                self.event("upload", path=target.path, size=target.size, via=target.via)
            if closed:
                self.send("ack", index, "SFTP: OK", SUCCESS)
            else:
                self.send("ack", index, "SFTP: Close failed", SERVER_ERROR)

    async def abort(self, message: str, status: int) -> None:
        if self.closed:
            return
        self.event("error", message=message, status=status)
        self.send("error", message, status)
        self.send("disconnect")
        await self.drain()
        self.close_reason = self.close_reason or f"error: {message}"
        self.done.set()

    async def end_session(self, reason: str) -> None:
        if self.closed:
            return
        self.send("disconnect")
        await self.drain()
        self.close_reason = self.close_reason or reason
        self.done.set()

    async def shutdown(self) -> None:
        """Peer stopping: tell the client, then let run() clean up."""
        self.close_reason = self.close_reason or "peer shutting down"
        self.send("disconnect")
        await self.drain()
        self.done.set()
        with contextlib.suppress(Exception):
            self.writer.close()

    async def cleanup(self) -> None:
        if self.session is not None:
            self.session.typed.flush(False)
        for stream in list(self.out_streams.values()):
            with contextlib.suppress(Exception):
                await stream.finish(False)
        for target in list(self.in_streams.values()):
            if isinstance(target, Upload):
                with contextlib.suppress(Exception):
                    await target.handle.close()
                self.event("upload_failed", path=target.path, error="stream not ended",
                           size=target.size)
        self.in_streams.clear()
        counters = {}
        if self.session is not None:
            counters = self.session.counters()
            with contextlib.suppress(Exception):
                await self.session.close()
        self.event("disconnect", reason=self.close_reason or "closed",
                   syncs_acked=self.syncs_acked, **counters)
        self.closed = True
        with contextlib.suppress(Exception):
            self.writer.close()
            await wait_for(self.writer.wait_closed(), 2)


# ----------------------------------------------------------------------------------------------
# The server


class Peer:
    def __init__(self, events: EventLog, handshake_timeout: float, client_timeout: float,
                 without: frozenset[str] = frozenset()) -> None:
        self.events = events
        self.without = without
        self.handshake_timeout = handshake_timeout
        self.client_timeout = client_timeout
        self.conns: set[Connection] = set()
        self.tasks: set[asyncio.Task] = set()
        self._seq = 0

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, reader, writer)
        self.conns.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            await conn.run()
        finally:
            self.conns.discard(conn)
            if task is not None:
                self.tasks.discard(task)

    async def serve(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = await asyncio.start_server(self.handle, host, port, reuse_address=True)
        bound = server.sockets[0].getsockname()
        print(f"guacd_peer listening on {bound[0]}:{bound[1]}", flush=True)
        self.events.write("listening", None, address=f"{bound[0]}:{bound[1]}", pid=os.getpid())
        await stop.wait()
        server.close()
        for conn in list(self.conns):
            with contextlib.suppress(Exception):
                await conn.shutdown()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=5)
        for task in list(self.tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await wait_for(server.wait_closed(), 2)
        self.events.write("shutdown", None)


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


FAIL_READ_AFTER_ENV = "GUACD_PEER_FAIL_READ_AFTER"
FAIL_READ_NAME_ENV = "GUACD_PEER_FAIL_READ_NAME"


class FailRead:
    """The test knob that makes SFTP downloads fail a read (see the docstring's "Test knobs")."""

    def __init__(self, after: int, name: str | None) -> None:
        self.after = after
        self.name = name

    @classmethod
    def from_env(cls, env) -> "FailRead | None":
        raw = env.get(FAIL_READ_AFTER_ENV)
        name = env.get(FAIL_READ_NAME_ENV)
        if raw is None:
            if name is not None:
                raise ValueError(f"{FAIL_READ_NAME_ENV} is set without {FAIL_READ_AFTER_ENV}")
            return None
        if not raw.isascii() or not raw.isdigit():
            raise ValueError(f"{FAIL_READ_AFTER_ENV} must be a number of bytes, got {raw!r}")
        if name is not None and (not name or "/" in name):
            raise ValueError(f"{FAIL_READ_NAME_ENV} must be a file's base name, got {name!r}")
        return cls(int(raw), name)

    def after_for(self, path: str) -> int | None:
        """Bytes after which a download of ``path`` fails its next read, or None."""
        if self.name is not None and posixpath.basename(path) != self.name:
            return None
        return self.after


FAIL_READ: FailRead | None = None


def main(argv: list[str] | None = None) -> int:
    global FAIL_READ
    try:
        FAIL_READ = FailRead.from_env(os.environ)
    except ValueError as e:
        print(f"guacd_peer: {e}", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(description="guacd test double (NOT guacd); see the docstring")
    ap.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 4822),
                    help="HOST:PORT to listen on (default 127.0.0.1:4822; port 0 = any free)")
    ap.add_argument("--events", help="append one JSON line per notable event to this file")
    ap.add_argument("--handshake-timeout", type=float, default=15.0,
                    help="seconds allowed for select..connect (guacd: 15)")
    ap.add_argument("--client-timeout", type=float, default=15.0,
                    help="seconds of client silence before dropping it (guacd: 15)")
    ap.add_argument("--without-plugin", action="append", default=[], metavar="PROTOCOL",
                    choices=sorted(PROTOCOLS),
                    help="act as a guacd without this protocol's plugin (silent after select)")
    args = ap.parse_args(argv)
    events = EventLog(args.events)
    peer = Peer(events, args.handshake_timeout, args.client_timeout,
                frozenset(args.without_plugin))
    try:
        asyncio.run(peer.serve(*args.listen))
    finally:
        events.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
