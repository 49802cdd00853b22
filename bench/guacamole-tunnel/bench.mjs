// Runs the Guacamole tunnel benchmark: one fake guacd, exoagent guacamole-web and guacamole-lite relaying to it, and the direct baseline; prints a Markdown report.
//   node bench.mjs --bin target/release/exoagent [--runs 10] [--mib 64] [--round-trips 10000] [--warmup 500] [--json FILE]
import { spawn, execFileSync } from 'node:child_process';
import { createInterface } from 'node:readline';
import { createCipheriv, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { openDirect, openWebSocket, receiveStream, check, roundTrip } from './client.mjs';
import { buildWorkload, digest, splitTest } from './workload.mjs';

const here = path.dirname(new URL(import.meta.url).pathname);
const { values: opt } = parseArgs({
  options: {
    bin: { type: 'string' }, runs: { type: 'string', default: '10' }, mib: { type: 'string', default: '64' },
    'round-trips': { type: 'string', default: '10000' }, warmup: { type: 'string', default: '500' }, json: { type: 'string' },
  },
});
const RUNS = Number(opt.runs), TARGET = Number(opt.mib) << 20;
const ROUND_TRIPS = Number(opt['round-trips']), WARMUP = Number(opt.warmup);
const HZ = Number(execFileSync('getconf', ['CLK_TCK']).toString());
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'guac-tunnel-bench-'));
const children = [];
let guacdPid;

// ---- processes ---------------------------------------------------------------------------

function start(name, argv) {
  const log = fs.openSync(path.join(work, `${name}.log`), 'a');
  const child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', log], cwd: here });
  child.log = path.join(work, `${name}.log`);
  child.on('error', (e) => { console.error(`${name}: ${e.message}`); process.exit(1); });
  children.push(child);
  return child;
}

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

async function until(what, probe, seconds = 30) {
  for (const t0 = Date.now(); Date.now() - t0 < seconds * 1000; await sleep(100)) {
    if (await probe().catch(() => false)) return;
  }
  throw new Error(`${what} did not come up in ${seconds} s (logs in ${work})`);
}

const accepts = (port) => new Promise((resolve) => {
  const s = net.connect(port, '127.0.0.1', () => { s.destroy(); resolve(true); });
  s.on('error', () => resolve(false));
});

/** utime + stime of a process, in seconds. */
function cpuSeconds(pid) {
  const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(fields[11]) + Number(fields[12])) / HZ;
}

/** Machine-wide busy CPU (all cores, not idle or iowait), in seconds. */
function machineBusySeconds() {
  const [, ...t] = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).map(Number);
  return (t.slice(0, 8).reduce((a, b) => a + b, 0) - t[3] - t[4]) / HZ;
}

function memoryMiB(pid, key) {
  const line = fs.readFileSync(`/proc/${pid}/status`, 'utf8').split('\n').find((l) => l.startsWith(key));
  return Number(line.split(/\s+/)[1]) / 1024;
}

async function startGuacd() {
  const child = start('fake-guacd', ['node', 'fake-guacd.mjs', '0', String(TARGET)]);
  const [line] = await Promise.race([
    createInterface({ input: child.stdout })[Symbol.asyncIterator]().next().then((r) => [r.value]),
    sleep(60000).then(() => ['']),
  ]);
  const port = Number(/^listening (\d+)$/.exec(line ?? '')?.[1]);
  if (!port) throw new Error(`fake guacd did not start (logs in ${work})`);
  guacdPid = child.pid;
  return port;
}

async function startExoagent(guacdPort) {
  const port = await freePort();
  const passwordFile = path.join(work, 'password');
  fs.writeFileSync(passwordFile, 'bench passphrase\n', { mode: 0o600 });
  const config = {
    listen: `127.0.0.1:${port}`, guacd: `127.0.0.1:${guacdPort}`, username: 'bench',
    password_file: passwordFile, session_timeout_s: 3600,
    connections: { bench: { protocol: 'vnc', parameters: { hostname: '127.0.0.1', port: '5901', password: '${GUAC_PASSWORD}' } } },
  };
  const configFile = path.join(work, 'exoagent-web.json');
  fs.writeFileSync(configFile, JSON.stringify(config, null, 2));
  const child = start('exoagent', [path.resolve(opt.bin), 'guacamole-web', '--config', configFile]);
  const base = `http://127.0.0.1:${port}/guacamole`;
  await until('exoagent guacamole-web', async () => (await fetch(`${base}/api/exoagent/health`)).ok);
  const login = await fetch(`${base}/api/tokens`, {
    method: 'POST', body: new URLSearchParams({ username: 'bench', password: 'bench passphrase' }),
  });
  const { authToken } = await login.json();
  const url = `ws://127.0.0.1:${port}/guacamole/websocket-tunnel?token=${authToken}&GUAC_ID=bench&GUAC_TYPE=c`
    + '&GUAC_DATA_SOURCE=default&GUAC_WIDTH=1024&GUAC_HEIGHT=768&GUAC_DPI=96&GUAC_IMAGE=image%2Fpng';
  return { child, url };
}

/** guacamole-lite's token: base64 of JSON {iv, value}, value AES-256-CBC of the connection JSON. */
function liteToken(key) {
  const iv = randomBytes(16);
  const cipher = createCipheriv('aes-256-cbc', Buffer.from(key), iv);
  const settings = { hostname: '127.0.0.1', port: '5901', password: 'bench passphrase' };
  const json = JSON.stringify({ connection: { type: 'vnc', settings } });
  const value = cipher.update(json, 'utf8', 'base64') + cipher.final('base64');
  return Buffer.from(JSON.stringify({ iv: iv.toString('base64'), value })).toString('base64');
}

async function startLite(guacdPort) {
  const port = await freePort();
  const key = randomBytes(16).toString('hex'); // 32 characters
  const child = start('guacamole-lite', ['node', 'lite-server.mjs', String(port), String(guacdPort), key]);
  child.stdout.resume(); // its connection log
  await until('guacamole-lite', () => accepts(port));
  const url = `ws://127.0.0.1:${port}/?token=${encodeURIComponent(liteToken(key))}&width=1024&height=768&dpi=96`;
  return { child, url };
}

// ---- measurements -------------------------------------------------------------------------

/** The last `Error: …` line a relay wrote before it exited. */
const lastError = (p) => (fs.readFileSync(p.child.log, 'utf8').match(/^\w*Error: .*$/gm) ?? ['?']).at(-1);
const alive = (p) => !p.child || p.child.exitCode === null && p.child.signalCode === null;
const cpu = (p) => (p.child && alive(p) ? cpuSeconds(p.child.pid) : NaN);

async function streamOnce(p, what, expected, timeoutMs) {
  if (!alive(p)) return { outcome: 'relay process had exited' };
  let tunnel;
  try { tunnel = await p.open(); } catch (e) { return { outcome: `tunnel failed: ${e.message}` }; }
  const c0 = cpu(p), g0 = cpuSeconds(guacdPid), u0 = process.cpuUsage();
  const r = await receiveStream(tunnel, what, timeoutMs);
  const cpuS = cpu(p) - c0, guacdCpu = cpuSeconds(guacdPid) - g0;
  const u = process.cpuUsage(u0), clientCpu = (u.user + u.system) / 1e6;
  tunnel.close();
  await sleep(200);
  const c = check(r.chunks, tunnel.relayed, expected, p.unit ?? 'codepoints');
  return {
    outcome: r.outcome, seconds: r.seconds, mibps: c.bytes / 2 ** 20 / r.seconds, cpu: cpuS, clientCpu, guacdCpu,
    ...c, relayAlive: alive(p),
  };
}

/** Sequential round trips, taking turns across the paths so that load drift hits all alike. */
async function latency(paths) {
  const live = Object.entries(paths).filter(([, p]) => alive(p));
  const tunnels = await Promise.all(live.map(([, p]) => p.open()));
  const out = Object.fromEntries(live.map(([name]) => [name, { times: [] }]));
  let c0;
  for (let i = 0; i < WARMUP + ROUND_TRIPS; i++) {
    if (i === WARMUP) c0 = live.map(([, p]) => cpu(p));
    for (let k = 0; k < live.length; k++) {
      const us = await roundTrip(tunnels[k], i);
      if (i >= WARMUP) out[live[k][0]].times.push(us);
    }
  }
  live.forEach(([name, p], k) => { out[name].cpuPerRoundTripUs = ((cpu(p) - c0[k]) / ROUND_TRIPS) * 1e6; });
  for (const t of tunnels) t.close();
  await sleep(200);
  return out;
}

const sorted = (xs) => [...xs].sort((a, b) => a - b);
const quantile = (xs, q) => { const s = sorted(xs); return s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]; };
const median = (xs) => quantile(xs, 0.5);

// ---- report -------------------------------------------------------------------------------

function report(results, meta) {
  const [d, e, l] = ['direct', 'exoagent', 'guacamole-lite'].map((n) => results[n]);
  const f = (x, digits = 1) => (Number.isFinite(x) ? x.toFixed(digits) : 'n/a');
  const ratio = (a, b) => (Number.isFinite(a) && Number.isFinite(b) && b !== 0 ? `${(a / b).toFixed(2)}×` : '—');
  const ok = (r) => r.runs.filter((x) => x.outcome === 'done');
  const tp = (r) => ok(r).map((x) => x.mibps);
  const rows = [];
  const row = (label, get, digits = 1, relayOnly = false) => {
    const [vd, ve, vl] = [d, e, l].map(get);
    rows.push(`| ${label} | ${relayOnly ? '—' : show(vd, digits)} | ${show(ve, digits)} | ${show(vl, digits)} | ${typeof ve === 'number' ? ratio(ve, vl) : '—'} |`);
  };
  const show = (v, digits) => (typeof v === 'number' ? f(v, digits) : v);
  row('throughput, MiB/s (median)', (r) => median(tp(r)));
  row('throughput, MiB/s (min – max)', (r) => `${f(Math.min(...tp(r)))} – ${f(Math.max(...tp(r)))}`);
  row(`runs completed / instructions identical (of ${meta.runs})`, (r) => `${ok(r).length} / ${r.runs.filter((x) => x.identical).length}`);
  row('… whole stream parsable by guacamole-common-js 1.5 (UTF-16 lengths)', (r) => `${ok(r).filter((x) => x.pageParses).length} of ${ok(r).length}`);
  row(`relay CPU per ${f(meta.workloadBytes / 2 ** 20, 0)} MiB run, s (median)`, (r) => median(ok(r).map((x) => x.cpu)), 2, true);
  row('relay CPU per MiB relayed, ms', (r) => median(ok(r).map((x) => (x.cpu / (x.bytes / 2 ** 20)) * 1000)), 2, true);
  row('run time, s (median)', (r) => median(ok(r).map((x) => x.seconds)), 3);
  row('client CPU per run, s (median; Node, ws)', (r) => median(ok(r).map((x) => x.clientCpu)), 2);
  row('fake guacd CPU per run, s (median)', (r) => median(ok(r).map((x) => x.guacdCpu)), 2);
  const sum = (xs) => xs.reduce((a, b) => a + b, 0);
  row('messages (TCP reads for direct) per run, median', (r) => median(ok(r).map((x) => x.chunks)), 0);
  row('… ending mid-instruction, all completed runs', (r) => `${sum(ok(r).map((x) => x.midInstruction))} of ${sum(ok(r).map((x) => x.chunks))}`);
  row('sync round trip, µs (median)', (r) => median(r.latency.times), 0);
  row('sync round trip, µs (p99)', (r) => quantile(r.latency.times, 0.99), 0);
  row('added latency vs direct, µs (median)', (r) => median(r.latency.times) - median(d.latency.times), 0, true);
  row('added latency vs direct, µs (p99)', (r) => quantile(r.latency.times, 0.99) - quantile(d.latency.times, 0.99), 0, true);
  row('relay CPU per round trip, µs', (r) => r.latency.cpuPerRoundTripUs, 0, true);
  row('relay RSS after start, MiB', (r) => r.rssStart, 1, true);
  row('relay peak RSS (VmHWM, highest sampled after each run), MiB', (r) => r.peakRss, 1, true);
  row('relay process died and was restarted (throughput runs, incl. warm-up)', (r) => String(r.restarts), 0, true);
  row('UTF-8 split test (é and 😀 cut across TCP writes)', (r) => r.split, 0);
  return [
    `${meta.workloadBytes} bytes of instruction text per run (${f(meta.workloadBytes / 2 ** 20)} MiB), ${meta.runs} runs each, interleaved;`
      + ` ${meta.roundTrips} sequential round trips after ${meta.warmup} warm-up.`,
    '',
    '| metric | direct to fake guacd (baseline) | exoagent guacamole-web | guacamole-lite | exoagent ÷ lite |',
    '|---|---|---|---|---|',
    ...rows,
  ].join('\n');
}

// ---- main ---------------------------------------------------------------------------------

async function main() {
  const workload = buildWorkload(TARGET);
  const expected = digest(workload);
  const split = splitTest();
  const splitExpected = digest([split.bytes]);
  const guacdPort = await startGuacd();
  const relay = async (startRelay) => {
    const p = { restarts: -1, open: () => openWebSocket(p.url) };
    p.start = async () => { Object.assign(p, await startRelay(guacdPort)); p.restarts++; };
    await p.start();
    return p;
  };
  const paths = {
    direct: { open: () => openDirect(guacdPort) },
    // exoagent speaks UTF-16 lengths to browsers, as its page's guacamole-common-js 1.5 reads them.
    exoagent: Object.assign(await relay(startExoagent), { unit: 'utf16' }),
    'guacamole-lite': await relay(startLite),
  };
  const results = {};
  for (const [name, p] of Object.entries(paths)) {
    results[name] = { runs: [], rssStart: p.child ? memoryMiB(p.child.pid, 'VmRSS') : NaN };
  }
  // A relay that died (guacamole-lite on a UTF-8 character split across reads) is started again.
  const samplePeak = (p) => { if (p.child && alive(p)) p.peak = Math.max(p.peak ?? 0, memoryMiB(p.child.pid, 'VmHWM')); };
  const streamRun = async (p, ...args) => {
    const r = await streamOnce(p, ...args);
    samplePeak(p);
    if (!alive(p)) await p.start();
    return r;
  };
  const loadBefore = os.loadavg(), busy0 = machineBusySeconds(), wall0 = Date.now();
  const ours0 = children.reduce((a, c) => a + cpuSeconds(c.pid), 0) + process.cpuUsage().user / 1e6 + process.cpuUsage().system / 1e6;
  for (const [name, p] of Object.entries(paths)) { // warm-up (JIT, allocators), not counted
    const r = await streamRun(p, 'throughput', expected, 120000);
    console.error(`warm-up ${name}: ${r.outcome} ${Number(r.mibps).toFixed(1)} MiB/s`);
  }
  for (let i = 0; i < RUNS; i++) {
    for (const [name, p] of Object.entries(paths)) {
      const r = await streamRun(p, 'throughput', expected, 120000);
      results[name].runs.push(r);
      console.error(`run ${i + 1} ${name}: ${r.outcome} ${Number(r.mibps).toFixed(1)} MiB/s cpu ${Number(r.cpu).toFixed(2)} s`
        + ` identical=${r.identical} messages=${r.chunks} mid=${r.midInstruction}${r.parseError ? ` (${r.parseError})` : ''}`);
    }
  }
  const rtt = await latency(paths);
  Object.values(paths).forEach(samplePeak);
  for (const [name, p] of Object.entries(paths)) {
    results[name].latency = rtt[name] ?? { times: [NaN], cpuPerRoundTripUs: NaN };
    console.error(`latency ${name}: median ${median(results[name].latency.times).toFixed(0)} µs`);
    results[name].peakRss = p.peak ?? NaN;
    results[name].restarts = p.restarts ?? 0;
  }
  for (const [name, p] of Object.entries(paths)) { // last: it may kill a relay
    const r = await streamRun(p, 'utf8-split', splitExpected, 5000);
    const died = r.relayAlive === false && `relay crashed: ${lastError(p).replace(/^Error: /, '')}`;
    results[name].split = r.identical ? 'identical' : died || (r.outcome === 'done' ? 'altered' : r.outcome);
    results[name].splitDetail = r;
    console.error(`utf8-split ${name}: ${results[name].split}`);
  }
  // CPU the rest of the machine used meanwhile (other users' work; a dead relay's last CPU is missed).
  const live = children.filter((c) => c.exitCode === null && c.signalCode === null);
  const ours = live.reduce((a, c) => a + cpuSeconds(c.pid), 0) + (process.cpuUsage().user + process.cpuUsage().system) / 1e6 - ours0;
  const wall = (Date.now() - wall0) / 1000, busy = machineBusySeconds() - busy0;
  const meta = {
    wall, machineBusy: busy, otherCpu: busy - ours,
    runs: RUNS, roundTrips: ROUND_TRIPS, warmup: WARMUP, workloadBytes: expected.bytes,
    node: process.version, cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, loadBefore, loadAfter: os.loadavg(),
    guacamoleLite: JSON.parse(fs.readFileSync(path.join(here, 'node_modules/guacamole-lite/package.json'))).version,
    ws: JSON.parse(fs.readFileSync(path.join(here, 'node_modules/ws/package.json'))).version,
    date: new Date().toISOString(),
  };
  console.log(report(results, meta));
  console.log(`\nNode ${meta.node}, guacamole-lite ${meta.guacamoleLite}, ws ${meta.ws}; ${meta.cpus} × ${meta.cpuModel};`
    + ` machine CPU busy ${meta.machineBusy.toFixed(1)} core-s over ${meta.wall.toFixed(1)} s, of which about ${Math.max(0, meta.otherCpu).toFixed(1)} core-s outside the benchmark's processes;`
    + ` load average before ${loadBefore.map((x) => x.toFixed(2)).join(' ')}, after ${meta.loadAfter.map((x) => x.toFixed(2)).join(' ')}; ${meta.date}`);
  if (opt.json) fs.writeFileSync(opt.json, JSON.stringify({ meta, results }, null, 1));
}

const cleanup = () => { for (const c of children) c.kill('SIGTERM'); };
process.on('exit', cleanup);
main().then(() => { cleanup(); setTimeout(() => { fs.rmSync(work, { recursive: true, force: true }); process.exit(0); }, 300); }, (e) => { console.error(e); cleanup(); process.exit(1); });
