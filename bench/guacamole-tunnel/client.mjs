// The benchmark client: opens a tunnel (TCP straight to guacd, or a relay's WebSocket), times the workload and sync round trips, and checks what arrived.
import net from 'node:net';
import { createHash } from 'node:crypto';
import { StringDecoder } from 'node:string_decoder';
import WebSocket from 'ws';
import { Parser, encode, instructionEnds } from './protocol.mjs';
import { END_MARKER } from './workload.mjs';

/**
 * A tunnel: `send(text)`, `onChunk(buf)` per WebSocket message (or TCP read), `onClose()`,
 * `close()`. `relayed` tunnels start with the relay's internal `0.,N.<id>;` instruction.
 */
class Tunnel {
  constructor(relayed) { this.relayed = relayed; this.onChunk = () => {}; this.onClose = () => {}; }
}

/** guacd's handshake done by the client itself (the baseline without a relay). */
export function openDirect(port) {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.setNoDelay(true);
    const tunnel = new Tunnel(false);
    const decoder = new StringDecoder('utf8');
    let ready = false;
    const parser = new Parser((opcode, args) => {
      if (opcode === 'args') {
        socket.write(encode('size', 1024, 768, 96) + encode('audio') + encode('video') + encode('image', 'image/png')
          + encode('connect', 'VERSION_1_5_0', '127.0.0.1', '5901', 'bench', '', ''));
      } else if (opcode === 'ready') {
        ready = true;
        resolve(tunnel);
      } else reject(new Error(`guacd sent ${opcode} ${args}`));
    });
    socket.on('data', (data) => (ready ? tunnel.onChunk(data) : parser.push(decoder.write(data))));
    socket.on('error', reject);
    socket.on('close', () => tunnel.onClose());
    tunnel.send = (text) => socket.write(text);
    tunnel.close = () => socket.destroy();
    socket.write(encode('select', 'vnc'));
  });
}

/** A relay's WebSocket tunnel (subprotocol `guacamole`); resolves once the first message came. */
export function openWebSocket(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, 'guacamole');
    const tunnel = new Tunnel(true);
    let opened = false;
    ws.on('message', (data) => {
      if (opened) return tunnel.onChunk(data);
      opened = true;
      tunnel.early = [data]; // the relay's `0.,N.<id>;`
      resolve(tunnel);
    });
    ws.on('error', reject);
    ws.on('close', (code, reason) => { reject(new Error(`closed ${code} ${reason}`)); tunnel.onClose(); });
    tunnel.send = (text) => ws.send(text);
    tunnel.close = () => ws.terminate();
  });
}

/** Collect chunks until the stream ends with END_MARKER (or the tunnel closes, or timeout). */
function collect(tunnel, chunks, timeoutMs) {
  return new Promise((resolve) => {
    let tail = Buffer.alloc(0);
    const finish = (outcome) => { clearTimeout(timer); tunnel.onChunk = () => {}; tunnel.onClose = () => {}; resolve(outcome); };
    const timer = setTimeout(() => finish('timeout'), timeoutMs);
    tunnel.onChunk = (c) => {
      chunks.push(c);
      tail = c.length >= 64 ? c.subarray(-64) : Buffer.concat([tail, c]).subarray(-64);
      if (tail.length >= END_MARKER.length && tail.subarray(-END_MARKER.length).equals(END_MARKER)) finish('done');
    };
    tunnel.onClose = () => finish('closed');
  });
}

/** Ask guacd for `what` (`throughput` or `utf8-split`); returns the chunks and the seconds until the marker. */
export async function receiveStream(tunnel, what, timeoutMs = 120000) {
  const chunks = [];
  const earlier = tunnel.early ?? [];
  tunnel.early = [];
  const t0 = process.hrtime.bigint();
  tunnel.send(encode('bench', what));
  const outcome = await collect(tunnel, chunks, timeoutMs);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  return { outcome, seconds, chunks: earlier.concat(chunks) };
}

/**
 * What arrived, against `expected` ({bytes, sha256}): the stream after the relay's first
 * instruction, read with lengths in `unit` (how that relay's browser library counts them), whether
 * it holds exactly the expected instructions (compared re-encoded with code-point lengths), how
 * many chunks ended mid-instruction, and whether guacamole-common-js 1.5 (exoagent's page;
 * UTF-16 lengths) could parse it all.
 */
export function check(chunks, relayed, expected, unit = 'codepoints') {
  const all = Buffer.concat(chunks);
  const { ends, error } = instructionEnds(all, unit);
  const skip = relayed ? (ends[0] ?? 0) : 0;
  const payload = all.subarray(skip);
  const canonical = unit === 'codepoints' ? payload : instructionEnds(payload, unit, true).canonical;
  const sha256 = createHash('sha256').update(canonical).digest('hex');
  let offset = 0, k = 0, midInstruction = 0;
  for (const c of chunks) {
    offset += c.length;
    while (k < ends.length && ends[k] < offset) k++;
    if (!(k < ends.length && ends[k] === offset)) midInstruction++;
  }
  return {
    bytes: payload.length,
    identical: canonical.length === expected.bytes && sha256 === expected.sha256,
    chunks: chunks.length,
    midInstruction,
    parseError: error,
    pageParses: instructionEnds(payload, 'utf16').error === null,
  };
}

/** One sync round trip (`seq` makes the timestamp unique); resolves to the time in µs. */
export async function roundTrip(tunnel, seq) {
  const text = encode('sync', 1800000000000 + seq);
  const reply = Buffer.from(text);
  let seen = Buffer.alloc(0);
  const answered = new Promise((resolve, reject) => {
    tunnel.onChunk = (c) => { seen = Buffer.concat([seen, c]); if (seen.includes(reply)) resolve(); };
    tunnel.onClose = () => reject(new Error('tunnel closed during round trips'));
  });
  const t0 = process.hrtime.bigint();
  tunnel.send(text);
  await answered;
  return Number(process.hrtime.bigint() - t0) / 1000;
}
