// WebSocket round trips for bench/tls-front: one connection per target, sequential echoes of a
// fixed-size binary message, taking turns over the targets in slices so that outside load hits
// all alike. Prints JSON {target: {n, p50_us, p99_us, mean_us}} on stdout.
//   node ws-rtt.mjs --ca CERT --size BYTES --round-trips N --warmup W --slices S NAME=URL...
import { readFileSync } from 'node:fs';
import WebSocket from 'ws';

const args = process.argv.slice(2);
const opt = { size: 32, 'round-trips': 2000, warmup: 200, slices: 20, ca: null };
const targets = [];
for (let i = 0; i < args.length; i++) {
  if (args[i].startsWith('--')) opt[args[i].slice(2)] = args[++i];
  else { const at = args[i].indexOf('='); targets.push({ name: args[i].slice(0, at), url: args[i].slice(at + 1) }); }
}
const size = Number(opt.size), total = Number(opt['round-trips']), warmup = Number(opt.warmup);
const slices = Number(opt.slices);
const ca = opt.ca ? readFileSync(opt.ca) : undefined;
const payload = Buffer.alloc(size, 0x61);

function open(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { ca, perMessageDeflate: false });
    ws.binaryType = 'nodebuffer';
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
  });
}

function roundTrip(ws) {
  return new Promise((resolve, reject) => {
    const start = process.hrtime.bigint();
    ws.once('message', (data) => {
      const us = Number(process.hrtime.bigint() - start) / 1000;
      if (data.length !== size) reject(new Error(`echo of ${data.length} bytes, sent ${size}`));
      else resolve(us);
    });
    ws.send(payload, { binary: true });
  });
}

const quantile = (sorted, q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];

const sockets = [];
for (const t of targets) sockets.push(await open(t.url));
for (const ws of sockets) for (let i = 0; i < warmup; i++) await roundTrip(ws);
const samples = targets.map(() => []);
const per = Math.ceil(total / slices);
for (let s = 0; s < slices; s++) {
  for (let k = 0; k < sockets.length; k++) {
    for (let i = 0; i < per && samples[k].length < total; i++) samples[k].push(await roundTrip(sockets[k]));
  }
}
const out = {};
targets.forEach((t, k) => {
  const sorted = samples[k].slice().sort((a, b) => a - b);
  out[t.name] = {
    n: sorted.length,
    p50_us: quantile(sorted, 0.5),
    p99_us: quantile(sorted, 0.99),
    mean_us: sorted.reduce((a, b) => a + b, 0) / sorted.length,
  };
});
for (const ws of sockets) ws.close();
console.log(JSON.stringify(out));
