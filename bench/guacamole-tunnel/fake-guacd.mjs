// A fake guacd for the tunnel benchmark: guacd's side of the handshake, then on request the fixed workload, `sync` echoes and the UTF-8 split test.
//   node fake-guacd.mjs PORT TARGET_BYTES   (prints "listening PORT" when ready; loopback only)
import net from 'node:net';
import { randomUUID } from 'node:crypto';
import { StringDecoder } from 'node:string_decoder';
import { setTimeout as sleep } from 'node:timers/promises';
import { Parser, encode } from './protocol.mjs';
import { buildWorkload, splitTest } from './workload.mjs';

const [port = '0', target = String(64 << 20)] = process.argv.slice(2);
const workload = buildWorkload(Number(target));
// What guacd 1.6.0 answers first (a version, then parameter names; VNC has more, a few suffice).
const ARGS = ['VERSION_1_5_0', 'hostname', 'port', 'password', 'color-depth', 'read-only'];
const KEEP_ALIVE_MS = 5000; // guacd's `nop` interval

function session(socket) {
  socket.setNoDelay(true);
  const decoder = new StringDecoder('utf8');
  let phase = 'select', busy = false, keepAlive = null;
  // As fast as the socket accepts: wait for 'drain' whenever the kernel buffer is full.
  const write = (data) => new Promise((resolve) => {
    if (socket.destroyed || socket.write(data)) return resolve();
    const done = () => { socket.off('drain', done); socket.off('close', done); resolve(); };
    socket.on('drain', done);
    socket.on('close', done);
  });

  const parser = new Parser((opcode, args) => {
    if (phase === 'select') {
      if (opcode !== 'select') return socket.destroy();
      phase = 'handshake';
      return void socket.write(encode('args', ...ARGS));
    }
    if (phase === 'handshake') {
      if (opcode !== 'connect') return; // size, audio, video, image, timezone, name
      if (args.length !== ARGS.length || args[1] !== '127.0.0.1') {
        console.error(`fake-guacd: bad connect ${JSON.stringify(args)}`);
        return void socket.end(encode('error', 'bad connect', 768));
      }
      phase = 'ready';
      keepAlive = setInterval(() => { if (!busy) socket.write(encode('nop')); }, KEEP_ALIVE_MS);
      return void socket.write(encode('ready', `$${randomUUID()}`));
    }
    if (opcode === 'sync') socket.write(encode('sync', ...args));
    else if (opcode === 'bench' && args[0] === 'throughput') run(async () => { for (const f of workload) await write(f); });
    else if (opcode === 'bench' && args[0] === 'utf8-split') {
      run(async () => { for (const piece of splitTest().pieces) { await write(piece); await sleep(50); } });
    }
  });
  const run = (job) => { busy = true; job().finally(() => { busy = false; }); };

  socket.on('data', (data) => {
    try { parser.push(decoder.write(data)); } catch (e) { console.error(`fake-guacd: ${e.message}`); socket.destroy(); }
  });
  socket.on('error', () => {});
  socket.on('close', () => clearInterval(keepAlive));
}

const server = net.createServer(session);
server.listen(Number(port), '127.0.0.1', () => console.log(`listening ${server.address().port}`));
