// exoagent's services through a real User Application Proxy: Debian's nginx configured from
// Exosphere's production UAP config (tests/uap/uap.py), a real Chromium (Debian's, driven by
// playwright-core) that resolves *.uap.test to the proxy and trusts its throw-away CA through an
// NSS database, a real JupyterLab started by `exoagent sandbox`, and the Guacamole web side
// (`exoagent guacamole-web`) in front of tests/guacamole/rig.py (real sshd; guacd is the test
// double guacd_peer.py). The TLS hop from the proxy to the instance is `exoagent front` (rustls).
//
// Run as root after `bash tests/browser/setup.sh`:   node --test tests/browser/uap.test.mjs
// (tests/browser/ runs with --test-concurrency=1: this file and guacamole.test.mjs share the
// rig's user.)
//
// Environment: EXOAGENT_BIN, EXOAGENT_GUAC_VENV, EXOAGENT_TEST_ARTIFACTS (as guacamole.test.mjs;
// this file's artifacts go to $EXOAGENT_TEST_ARTIFACTS/uap/).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import tls from 'node:tls';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { CHROMIUM, CHROMIUM_ARGS, VIEWPORT } from './chromium.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '../..');
const VENV = process.env.EXOAGENT_GUAC_VENV || '/var/tmp/exoagent-guac-venv';
const PYTHON = path.join(VENV, 'bin/python');
const RIG = path.join(REPO, 'tests/guacamole/rig.py');
const UAP = path.join(REPO, 'tests/uap/uap.py');
const NGINX = '/usr/sbin/nginx';
const BIN = process.env.EXOAGENT_BIN
    || path.join(process.env.CARGO_TARGET_DIR ? path.resolve(REPO, process.env.CARGO_TARGET_DIR) : path.join(REPO, 'target'), 'debug/exoagent');
const ARTIFACTS = path.join(path.resolve(REPO, process.env.EXOAGENT_TEST_ARTIFACTS || 'target/test-artifacts'), 'uap');
const SHELL_ID = Buffer.from('shell\0c\0default').toString('base64url');

// The "instances": loopback addresses in the proxy's network (127.0.0.0/24 in the generated
// config, as production's is the cloud's /24).
const IP = {
    jupyter: '127.0.0.2', // JupyterLab behind the agent's own TLS front (exoagent sandbox, [tls] enabled)
    guac: '127.0.0.3', // exoagent guacamole-web, plain HTTP
    echo: '127.0.0.4', // a header echo server (this file)
    frontJupyter: '127.0.0.5', // exoagent front (the test's certificate) → JupyterLab
    frontGuac: '127.0.0.6', // exoagent front → guacamole-web
    frontMutual: '127.0.0.7', // exoagent front --client-ca --require-tls → JupyterLab
};
const dashes = (ip) => ip.replaceAll('.', '-');

const T0 = Date.now();
const timings = {};
const S = {
    tmp: null, uap: null, uapExit: null, uapInfo: null, pki: {}, sandbox: null, agent: null, agentExit: null,
    jport: 0, passphrase: null, rig: null, rigExit: null, info: null, web: null, webExit: null, gport: 0,
    echo: null, echoSeen: [], fronts: [], home: null, udd: null, context: null, notebooks: [],
    tornDown: false,
};

// ---------------------------------------------------------------------------------------------
// Helpers

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const deadline = (ms, value) => new Promise((r) => setTimeout(() => r(value), ms).unref());
const secs = (ms) => `${(ms / 1000).toFixed(2)} s`;

function note(t, msg) {
    const line = `[${secs(Date.now() - T0)}] ${msg}`;
    if (t && t.diagnostic) t.diagnostic(line);
    else process.stderr.write(`# ${line}\n`);
}

async function waitFor(probe, { timeout = 15000, interval = 100, expected, seen } = {}) {
    const start = Date.now();
    let last;
    for (;;) {
        last = await probe();
        if (last) return last;
        if (Date.now() - start > timeout) {
            const observed = seen ? await seen(last) : JSON.stringify(last);
            throw new assert.AssertionError({ message: `expected ${expected} within ${secs(timeout)}; saw: ${observed}` });
        }
        await sleep(interval);
    }
}

function freePort(host = '127.0.0.1') {
    return new Promise((resolve, reject) => {
        const srv = net.createServer();
        srv.once('error', reject);
        srv.listen(0, host, () => {
            const { port } = srv.address();
            srv.close(() => resolve(port));
        });
    });
}

function tail(file, n = 3000) {
    try {
        return fs.readFileSync(file, 'utf8').slice(-n);
    } catch (e) {
        return `(${file}: ${e.message})`;
    }
}

function exited(exitPromise, ms) {
    return Promise.race([exitPromise, deadline(ms, null)]);
}

function alive(pid) {
    try {
        const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
        return !stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z');
    } catch {
        return false;
    }
}

/** Processes whose command line contains `needle` (not zombies), or of user `uid`. */
function processes({ needle, uid } = {}) {
    const out = [];
    for (const entry of fs.readdirSync('/proc')) {
        if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
        try {
            const stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
            if (stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z')) continue;
            if (uid !== undefined && fs.statSync(`/proc/${entry}`).uid === uid) {
                out.push(`${entry} ${stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'))}`);
                continue;
            }
            if (needle && fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8').includes(needle)) {
                out.push(`${entry} ${fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0').slice(0, 3).join(' ')}`);
            }
        } catch {
            // gone meanwhile
        }
    }
    return out;
}

function canConnect(host, port) {
    return new Promise((resolve) => {
        const s = net.connect({ host, port });
        s.once('connect', () => { s.destroy(); resolve(true); });
        s.once('error', () => resolve(false));
    });
}

/** A child process with its exit promise; stdout/stderr to `log` (a file in ARTIFACTS). */
function start(argv, log, opts = {}) {
    const fd = fs.openSync(path.join(ARTIFACTS, log), 'w');
    const child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', fd, fd], ...opts });
    fs.closeSync(fd);
    const exit = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
    return { child, exit, log };
}

async function stop(proc, what, problems, { signal = 'SIGTERM', ms = 10000 } = {}) {
    if (!proc || proc.child.exitCode !== null || proc.child.signalCode !== null) return;
    proc.child.kill(signal);
    const x = await exited(proc.exit, ms);
    if (!x) {
        problems.push(`${what} did not exit within ${ms / 1000} s of ${signal} (killed)`);
        proc.child.kill('SIGKILL');
        await exited(proc.exit, 5000);
    }
}

/** The proxy hostname for an instance address and port; `proto` "http", "https" or "" (default). */
function uapHost(ip, port, proto = '') {
    return `${proto ? `${proto}-` : ''}${dashes(ip)}-${port}.${S.uapInfo.domain}`;
}

/**
 * A request to one of the proxy's servers as a browser would send it: TLS to the proxy's
 * address with the proxy hostname as SNI and Host, the throw-away CA as the only trust anchor.
 */
function uapRequest(server, hostname, pathq, { method = 'GET', headers = {}, body } = {}) {
    const { address, port } = S.uapInfo.servers[server];
    return new Promise((resolve, reject) => {
        const req = https.request({
            host: address, port, servername: hostname, method, path: pathq, agent: false,
            ca: fs.readFileSync(S.uapInfo.ca), headers: { Host: hostname, ...headers },
        }, (res) => {
            const chunks = [];
            res.on('data', (c) => chunks.push(c));
            res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, text: Buffer.concat(chunks).toString('utf8') }));
        });
        req.on('error', reject);
        req.setTimeout(30000, () => req.destroy(new Error('timeout')));
        req.end(body);
    });
}

/** A request straight to an instance address (no proxy): plain, or TLS with options `tlsOpts`. */
function directRequest(host, port, pathq, tlsOpts) {
    const mod = tlsOpts ? https : http;
    return new Promise((resolve, reject) => {
        const req = mod.request({ host, port, path: pathq, agent: false, ...(tlsOpts || {}) }, (res) => {
            const chunks = [];
            res.on('data', (c) => chunks.push(c));
            res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, text: Buffer.concat(chunks).toString('utf8') }));
        });
        req.on('error', reject);
        req.setTimeout(15000, () => req.destroy(new Error('timeout')));
        req.end();
    });
}

/** The access log lines of the proxy (format `uap` in the generated config). */
function accessLog() {
    try {
        return fs.readFileSync(S.uapInfo.access_log, 'utf8').split('\n').filter(Boolean);
    } catch {
        return [];
    }
}

function readEvents() {
    if (!S.info) return [];
    let text = '';
    try {
        text = fs.readFileSync(S.info.events, 'utf8');
    } catch {
        return [];
    }
    return text.split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l));
}

function eventsOf(conn, name) {
    return readEvents().filter((e) => e.conn === conn && (!name || e.event === name));
}

async function newPage(label) {
    const page = await S.context.newPage();
    page.on('pageerror', (e) => note(null, `${label}: page error: ${e.message}`));
    page.on('console', (m) => {
        if (m.type() === 'error') note(null, `${label}: console error: ${m.text()}`);
    });
    return page;
}

function uapPy(args) {
    const r = spawnSync('python3', [UAP, ...args], { encoding: 'utf8', timeout: 30000 });
    assert.equal(r.status, 0, `expected python3 tests/uap/uap.py ${args.join(' ')} to succeed, saw ${r.status}: ${r.stderr}`);
    return JSON.parse(r.stdout);
}

// ---------------------------------------------------------------------------------------------
// Set-up

/** Certificates: the instances' (self-signed, as exoagent's own are), a wrong one, the UAP's client CA and client certificate. */
function makePki() {
    const dir = path.join(S.tmp, 'pki');
    // nginx checks the upstream's name with X509_check_host() only (ngx_ssl_check_host): the
    // name it checks by default is the address from proxy_pass, and it matches a DNS-type
    // subjectAltName spelled as that address (or the CN when there is no DNS name), never an
    // IP-type one. So the instances' certificate carries each address both ways.
    const sans = [IP.frontJupyter, IP.frontGuac, IP.frontMutual].flatMap((ip) => ['--san', `IP:${ip}`, '--san', `DNS:${ip}`]);
    S.pki.instance = uapPy(['issue', dir, 'instance', ...sans]);
    S.pki.wrong = uapPy(['issue', dir, 'wrong-instance', ...sans]);
    S.pki.clientCa = uapPy(['ca', dir, 'uap-client-ca', '--cn', 'exoagent test UAP client CA (throw-away)']);
    S.pki.client = uapPy(['issue', dir, 'uap-client', '--ca', 'uap-client-ca', '--client', '--san', 'DNS:uap-client.uap.test']);
    S.pki.otherCa = uapPy(['ca', dir, 'other-ca', '--cn', 'not the UAP client CA']);
    S.pki.otherClient = uapPy(['issue', dir, 'other-client', '--ca', 'other-ca', '--client', '--san', 'DNS:other-client.uap.test']);
}

async function startUap() {
    const spec = {
        domain: 'uap.test',
        net: '127.0.0',
        servers: [
            { name: 'prod' }, // production: proxy_ssl_verify off
            { name: 'verify', verify: S.pki.instance.cert }, // the instance's certificate pinned
            { name: 'wrong', verify: S.pki.wrong.cert }, // a different certificate pinned
            { name: 'mutual', verify: S.pki.instance.cert, client_cert: S.pki.client.cert, client_key: S.pki.client.key },
            // The agent's generated certificate pinned, with nginx's default proxy_ssl_name
            // (the instance's address): the certificate names each address also as a DNS name,
            // the only kind nginx checks (tests/uap/README.md, "Finding").
            { name: 'agent-pin', verify: S.agentCert },
        ],
    };
    const specFile = path.join(S.tmp, 'uap-spec.json');
    fs.writeFileSync(specFile, JSON.stringify(spec));
    const started = Date.now();
    const errLog = fs.createWriteStream(path.join(ARTIFACTS, 'uap.stderr.log'));
    const uap = spawn('python3', [UAP, 'up', specFile], { stdio: ['pipe', 'pipe', 'pipe'] });
    S.uap = uap;
    S.uapExit = new Promise((resolve) => uap.once('exit', (code, signal) => resolve({ code, signal })));
    uap.stderr.pipe(errLog);
    const lines = readline.createInterface({ input: uap.stdout });
    const first = await Promise.race([
        new Promise((resolve) => lines.once('line', resolve)),
        S.uapExit.then((x) => ({ exit: x })),
        deadline(30000, { timeout: true }),
    ]);
    if (typeof first !== 'string') {
        await sleep(200);
        throw new Error(`uap.py did not print its JSON line (${JSON.stringify(first)}); stderr:\n${tail(path.join(ARTIFACTS, 'uap.stderr.log'))}`);
    }
    S.uapInfo = JSON.parse(first);
    fs.copyFileSync(S.uapInfo.conf, path.join(ARTIFACTS, 'nginx.conf'));
    timings['uap up'] = Date.now() - started;
}

/**
 * JupyterLab as exoagent runs it: `exoagent sandbox` with the jupyterlab service on 127.0.0.2
 * and `[tls] enabled = true`: the agent's own front (generated certificate) takes the public
 * port, JupyterLab moves to 127.0.0.1 at the port + 10000.
 */
async function startJupyter() {
    S.sandbox = path.join(S.tmp, 'sandbox');
    fs.mkdirSync(path.join(S.sandbox, 'etc/exoagent'), { recursive: true });
    // Port 8888: the only one Exosphere's notebook link leads to (the agent offers the link
    // there by default). JupyterLab itself moves to 127.0.0.1:18888 behind the front.
    S.jport = 8888;
    for (const [host, port] of [[IP.jupyter, S.jport], ['127.0.0.1', S.jport + 10000]]) {
        const probe = net.createServer();
        const ok = await new Promise((resolve) => {
            probe.once('error', () => resolve(false));
            probe.listen(port, host, () => probe.close(() => resolve(true)));
        });
        assert.ok(ok, `this test needs ${host}:${port} free (Exosphere's notebook link always leads to port 8888)`);
    }
    S.jbackend = `127.0.0.1:${S.jport + 10000}`;
    fs.writeFileSync(path.join(S.sandbox, 'etc/exoagent/config.toml'), [
        '[services.jupyterlab]', 'enabled = true', `bind = "${IP.jupyter}"`, `port = ${S.jport}`, 'start_timeout_s = 300', '',
        '[tls]', 'enabled = true', '',
    ].join('\n'));
    const started = Date.now();
    S.agent = start([BIN, 'sandbox', S.sandbox], 'agent.log');
    const r = await new Promise((resolve) => {
        const c = spawn(BIN, ['--sandbox-dir', S.sandbox, 'status', '--wait', '--timeout', '300s', '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
        let out = '';
        c.stdout.on('data', (d) => { out += d; });
        c.stderr.on('data', (d) => { out += d; });
        c.once('exit', (code) => resolve({ code, out }));
    });
    assert.equal(r.code, 0, `expected exoagent sandbox to report JupyterLab ready, saw exit ${r.code}: ${r.out}\nagent:\n${tail(path.join(ARTIFACTS, 'agent.log'))}`);
    S.passphrase = fs.readFileSync(path.join(S.sandbox, 'var/lib/exoagent/secrets/passphrase'), 'utf8').trim();
    S.status = JSON.parse(r.out);
    const jl = S.status.services.find((x) => x.service === 'jupyterlab');
    assert.equal(jl && jl.front && jl.front.state, 'ready', `expected the agent's TLS front for JupyterLab ready, saw ${JSON.stringify(jl)}`);
    S.agentCert = path.join(S.sandbox, 'var/lib/exoagent/tls/cert.pem');
    assert.ok(await canConnect('127.0.0.1', S.jport + 10000), `expected JupyterLab behind the front on ${S.jbackend}`);
    timings['jupyterlab ready'] = Date.now() - started;
}

async function startRig() {
    fs.mkdirSync(path.join(ARTIFACTS, 'rig'), { recursive: true });
    const errLog = fs.createWriteStream(path.join(ARTIFACTS, 'rig.stderr.log'));
    const started = Date.now();
    const rig = spawn(PYTHON, [RIG], { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, EXOGUAC_ARTIFACTS: path.join(ARTIFACTS, 'rig') } });
    S.rig = rig;
    S.rigExit = new Promise((resolve) => rig.once('exit', (code, signal) => resolve({ code, signal })));
    rig.stderr.pipe(errLog);
    const lines = readline.createInterface({ input: rig.stdout });
    const first = await Promise.race([
        new Promise((resolve) => lines.once('line', resolve)),
        S.rigExit.then((x) => ({ exit: x })),
        deadline(90000, { timeout: true }),
    ]);
    if (typeof first !== 'string') {
        await sleep(200);
        throw new Error(`rig.py did not print its JSON line (${JSON.stringify(first)}); stderr:\n${tail(path.join(ARTIFACTS, 'rig.stderr.log'))}`);
    }
    S.info = JSON.parse(first);
    timings['rig up'] = Date.now() - started;
}

/** `exoagent guacamole-web` for the rig, on 127.0.0.3 (the shell connection only). */
async function startWeb() {
    const passwordFile = path.join(S.tmp, 'guacamole-password');
    fs.writeFileSync(passwordFile, `${S.info.password}\n`, { mode: 0o600 });
    S.gport = await freePort(IP.guac);
    const config = {
        listen: `${IP.guac}:${S.gport}`,
        guacd: `127.0.0.1:${S.info.peer_port}`,
        username: S.info.user,
        password_file: passwordFile,
        session_timeout_s: 3600,
        connections: {
            shell: {
                protocol: 'ssh',
                parameters: { hostname: '127.0.0.1', port: String(S.info.ssh_port), username: S.info.user, password: '${GUAC_PASSWORD}' },
            },
        },
    };
    const configFile = path.join(S.tmp, 'guacamole-web.json');
    fs.writeFileSync(configFile, `${JSON.stringify(config, null, 2)}\n`);
    const started = Date.now();
    S.web = start([BIN, 'guacamole-web', '--config', configFile], 'guacamole-web.log');
    let last = '';
    await waitFor(async () => {
        if (S.web.child.exitCode !== null) throw new Error(`exoagent guacamole-web exited ${S.web.child.exitCode}:\n${tail(path.join(ARTIFACTS, 'guacamole-web.log'))}`);
        try {
            const r = await directRequest(IP.guac, S.gport, '/guacamole/api/exoagent/health');
            last = `${r.status}`;
            return r.status === 200;
        } catch (e) {
            last = e.code || e.message;
            return false;
        }
    }, { timeout: 30000, interval: 200, expected: 'GET /guacamole/api/exoagent/health → 200', seen: () => last });
    timings['web side healthy'] = Date.now() - started;
}

/** A plain-HTTP server on 127.0.0.4 that answers with what it received (method, path, headers). */
async function startEcho() {
    const port = await freePort(IP.echo);
    S.echoPort = port;
    S.echo = http.createServer((req, res) => {
        const seen = { method: req.method, url: req.url, headers: req.headers };
        S.echoSeen.push(seen);
        const body = JSON.stringify(seen);
        res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
        res.end(body);
    });
    await new Promise((resolve) => S.echo.listen(port, IP.echo, resolve));
}

/** `exoagent front` instances: TLS (rustls) on the instance addresses, in front of the services. */
async function startFronts() {
    const started = Date.now();
    const specs = [
        { name: 'jupyter', ip: IP.frontJupyter, backend: S.jbackend, extra: [] },
        { name: 'guac', ip: IP.frontGuac, backend: `${IP.guac}:${S.gport}`, extra: [] },
        { name: 'mutual', ip: IP.frontMutual, backend: S.jbackend, extra: ['--client-ca', S.pki.clientCa.cert, '--require-tls'] },
    ];
    for (const f of specs) {
        f.port = await freePort(f.ip);
        f.proc = start([BIN, 'front', '--listen', `${f.ip}:${f.port}`, '--backend', f.backend,
            '--cert', S.pki.instance.cert, '--key', S.pki.instance.key, ...f.extra], `front-${f.name}.log`);
        S.fronts.push(f);
    }
    for (const f of S.fronts) {
        await waitFor(async () => {
            if (f.proc.child.exitCode !== null) throw new Error(`exoagent front (${f.name}) exited ${f.proc.child.exitCode}:\n${tail(path.join(ARTIFACTS, f.proc.log))}`);
            return canConnect(f.ip, f.port);
        }, { timeout: 15000, expected: `exoagent front (${f.name}) listening on ${f.ip}:${f.port}` });
    }
    timings['fronts up'] = Date.now() - started;
}

const front = (name) => S.fronts.find((f) => f.name === name);

/** Chromium with a private HOME whose NSS database trusts the proxy's throw-away CA. */
async function startBrowser() {
    S.home = fs.mkdtempSync(path.join(os.tmpdir(), 'exoagent-uap-home-'));
    const db = path.join(S.home, '.pki/nssdb');
    fs.mkdirSync(db, { recursive: true });
    for (const argv of [
        ['certutil', '-N', '-d', `sql:${db}`, '--empty-password'],
        ['certutil', '-A', '-d', `sql:${db}`, '-n', 'exoagent-uap-test-ca', '-t', 'C,,', '-i', S.uapInfo.ca],
    ]) {
        const r = spawnSync(argv[0], argv.slice(1), { encoding: 'utf8' });
        assert.equal(r.status, 0, `expected ${argv.join(' ')} to succeed, saw ${r.status}: ${r.stderr}`);
    }
    S.udd = fs.mkdtempSync(path.join(os.tmpdir(), 'exoagent-chromium-uap-'));
    const started = Date.now();
    S.context = await chromium.launchPersistentContext(S.udd, {
        executablePath: CHROMIUM,
        headless: true,
        // *.uap.test is the proxy (one address; the other proxy servers are exercised from Node).
        args: [...CHROMIUM_ARGS, `--host-resolver-rules=MAP *.${S.uapInfo.domain} ${S.uapInfo.servers.prod.address}`],
        env: { ...process.env, HOME: S.home },
        viewport: VIEWPORT,
    });
    for (const p of S.context.pages()) await p.close();
    timings['chromium up'] = Date.now() - started;
}

// ---------------------------------------------------------------------------------------------
// Tear-down

async function teardown() {
    if (S.tornDown) return S.tornDownReport;
    S.tornDown = true;
    const problems = [];
    const started = Date.now();
    // Notebooks this run created in JupyterLab's root (the sandbox user's home): the flow
    // deletes them through the API; this catches a flow that failed half-way.
    for (const name of S.notebooks) fs.rmSync(path.join(os.homedir(), name), { force: true });
    let lap = Date.now();
    const laps = (what) => { timings[`teardown: ${what}`] = Date.now() - lap; lap = Date.now(); };
    if (S.context) await Promise.race([S.context.close().catch(() => {}), deadline(10000)]);
    laps('chromium');
    for (const f of S.fronts) {
        await stop(f.proc, `exoagent front (${f.name})`, problems);
        if (f.proc.child.exitCode !== null && f.proc.child.exitCode !== 0) problems.push(`exoagent front (${f.name}) exited ${f.proc.child.exitCode} after SIGTERM (expected 0)`);
    }
    laps('fronts');
    if (S.echo) await new Promise((resolve) => { S.echo.closeAllConnections(); S.echo.close(resolve); });
    await stop(S.web, 'exoagent guacamole-web', problems);
    if (S.agent) {
        await stop(S.agent, 'exoagent sandbox', problems, { signal: 'SIGKILL', ms: 5000 });
        // The services outlive the agent by design; `exoagent down` stops them.
        const r = spawnSync(BIN, ['--sandbox-dir', S.sandbox, 'down', '--grace', '5'], { encoding: 'utf8', timeout: 30000 });
        if (r.status !== 0) problems.push(`exoagent down exited ${r.status}: ${r.stderr}`);
    }
    laps('web side and sandbox');
    if (S.info) {
        try {
            fs.copyFileSync(S.info.events, path.join(ARTIFACTS, 'events.jsonl'));
        } catch {
            // never written
        }
    }
    if (S.rig && S.rig.exitCode === null && S.rig.signalCode === null) {
        S.rig.stdin.end();
        let x = await exited(S.rigExit, 40000);
        if (!x) {
            problems.push('rig.py did not finish its teardown within 40 s of stdin closing (SIGTERM sent)');
            S.rig.kill('SIGTERM');
            x = await exited(S.rigExit, 20000);
            if (!x) S.rig.kill('SIGKILL');
        }
        if (x && x.code !== 0) problems.push(`rig.py exited ${JSON.stringify(x)}`);
    }
    laps('rig');
    if (S.uapInfo) {
        for (const f of ['access.log', 'error.log']) {
            try {
                fs.copyFileSync(path.join(S.uapInfo.dir, 'logs', f), path.join(ARTIFACTS, `nginx-${f}`));
            } catch {
                // not written
            }
        }
    }
    if (S.uap && S.uap.exitCode === null && S.uap.signalCode === null) {
        S.uap.stdin.end();
        const x = await exited(S.uapExit, 20000);
        if (!x) {
            problems.push('uap.py did not stop nginx within 20 s of stdin closing');
            S.uap.kill('SIGKILL');
        } else if (x.code !== 0) {
            problems.push(`uap.py exited ${JSON.stringify(x)} (3 = nginx had to be killed)`);
        }
    }
    laps('nginx');
    let left = [];
    for (let i = 0; i < 50; i++) {
        left = [];
        if (S.udd) left.push(...processes({ needle: S.udd }));
        if (S.sandbox) left.push(...processes({ needle: S.sandbox }));
        if (S.uapInfo) left.push(...processes({ needle: S.uapInfo.dir }));
        for (const f of S.fronts) if (alive(f.proc.child.pid)) left.push(`${f.proc.child.pid} exoagent front`);
        for (const [name, child] of [['guacamole-web', S.web && S.web.child], ['rig.py', S.rig], ['uap.py', S.uap]]) {
            if (child && alive(child.pid)) left.push(`${child.pid} ${name}`);
        }
        if (S.info) left.push(...processes({ uid: fs.statSync(S.info.home).uid }));
        if (!left.length) break;
        await sleep(100);
    }
    laps('processes gone');
    if (left.length) problems.push(`processes left running: ${left.join(', ')}`);
    for (const dir of [S.udd, S.home, S.tmp]) if (dir) fs.rmSync(dir, { recursive: true, force: true });
    timings.teardown = Date.now() - started;
    fs.writeFileSync(path.join(ARTIFACTS, 'timings.json'), `${JSON.stringify(
        Object.fromEntries(Object.entries(timings).map(([k, v]) => [k, Number((v / 1000).toFixed(3))])), null, 2)}\n`);
    S.tornDownReport = { problems };
    return S.tornDownReport;
}

// A test process that ends without its teardown (a failure in before(), a CI timeout) must not
// leave the services behind; the rig and uap.py tear themselves down when their stdin closes,
// Chromium when its control pipe closes.
process.on('exit', () => {
    if (S.tornDown) return;
    for (const p of [S.web, S.agent, ...S.fronts.map((f) => f.proc)]) {
        if (p && p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGKILL');
    }
    if (S.sandbox) spawnSync(BIN, ['--sandbox-dir', S.sandbox, 'down', '--grace', '2'], { timeout: 10000 });
    if (S.tmp) fs.rmSync(S.tmp, { recursive: true, force: true });
});
process.once('SIGTERM', () => process.exit(143));

before(async () => {
    assert.equal(process.getuid(), 0, 'expected to run as root (rig.py creates a user; nginx listens on port 443 of private loopback addresses)');
    for (const [what, file] of [['Chromium', CHROMIUM], ['nginx (bash tests/uap/setup.sh)', NGINX],
        ['the venv python (bash tests/guacamole/setup.sh)', PYTHON], ['the exoagent binary (cargo build -p exoagent, or EXOAGENT_BIN)', BIN]]) {
        assert.ok(fs.existsSync(file), `expected ${what} at ${file}; it is missing — run bash tests/browser/setup.sh`);
    }
    fs.rmSync(ARTIFACTS, { recursive: true, force: true }); // this file's own directory
    fs.mkdirSync(ARTIFACTS, { recursive: true });
    S.tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'exoagent-uap-test-'));
    makePki();
    // The slow parts overlap: the rig (sshd, Xvnc, Xfce) and JupyterLab's install and start.
    // The proxy starts once the agent has generated its certificate (one server pins it).
    await Promise.all([startJupyter().then(startUap), startRig().then(startWeb), startEcho()]);
    await startFronts();
    await startBrowser();
    note(null, `up: ${JSON.stringify(Object.fromEntries(Object.entries(timings).map(([k, v]) => [k, secs(v)])))}; proxy ${JSON.stringify(S.uapInfo.servers)}`);
});

after(async () => {
    const report = await teardown();
    if (report.problems.length) process.stderr.write(`# teardown problems: ${report.problems.join('; ')}\n`);
});

// ---------------------------------------------------------------------------------------------
// Flows used by several tests

/** JupyterLab in Chromium at `base`: log in with the passphrase, run print(6*7), see 42. */
async function jupyterFlow(t, base, label) {
    const page = await newPage(label);
    const started = Date.now();
    try {
        await page.goto(`${base}/lab`);
        await page.waitForURL(/\/login/, { timeout: 30000 });
        await page.locator('input[type=password]').fill(S.passphrase);
        await Promise.all([page.waitForURL(/\/lab/, { timeout: 30000 }), page.locator('input[type=password]').press('Enter')]);
        timings[`${label}: login`] = Date.now() - started;
        // A notebook with one empty code cell, through the contents API (as the page's own
        // JavaScript would, with the XSRF cookie), then opened in the Lab.
        const name = `exoagent-uap-${crypto.randomBytes(4).toString('hex')}.ipynb`;
        S.notebooks.push(name);
        const put = await page.evaluate(async (n) => {
            const xsrf = (document.cookie.match(/(?:^|; )_xsrf=([^;]*)/) || [])[1] || '';
            const nb = {
                cells: [{ cell_type: 'code', id: 'c1', source: '', metadata: {}, outputs: [], execution_count: null }],
                metadata: { kernelspec: { name: 'python3', display_name: 'Python 3 (ipykernel)', language: 'python' } },
                nbformat: 4, nbformat_minor: 5,
            };
            const r = await fetch(`/api/contents/${encodeURIComponent(n)}`, {
                method: 'PUT', headers: { 'Content-Type': 'application/json', 'X-XSRFToken': decodeURIComponent(xsrf) },
                body: JSON.stringify({ type: 'notebook', format: 'json', content: nb }),
            });
            return { status: r.status, text: (await r.text()).slice(0, 300) };
        }, name);
        assert.ok(put.status === 201 || put.status === 200, `expected the notebook to be created (PUT /api/contents → 201), saw ${JSON.stringify(put)}`);
        // The kernel's WebSocket, seen by the browser: through the proxy (and the front).
        let channelFrames = 0;
        page.on('websocket', (ws) => {
            if (ws.url().includes('/channels')) ws.on('framereceived', () => { channelFrames += 1; });
        });
        await page.goto(`${base}/lab/tree/${name}`);
        const panel = page.locator('.jp-NotebookPanel:not(.lm-mod-hidden)');
        const editor = panel.locator('.jp-Cell .cm-content').first();
        await editor.waitFor({ timeout: 60000 });
        // The kernel has started and is idle (the toolbar's indicator), so the keystrokes land
        // in a ready notebook.
        await waitFor(async () => (await panel.locator('.jp-Notebook-ExecutionIndicator').first().getAttribute('data-status').catch(() => null)) === 'idle', {
            timeout: 60000, interval: 200, expected: `the kernel idle in ${label}`,
            seen: () => panel.locator('.jp-Notebook-ExecutionIndicator').first().getAttribute('data-status').catch((e) => e.message),
        });
        // ... and connected: the kernel has answered over its WebSocket (kernel_info_reply).
        await waitFor(() => channelFrames > 0, { timeout: 60000, expected: `a frame from the kernel over /api/kernels/…/channels in ${label}`, seen: () => `${channelFrames} frames` });
        await sleep(500);
        const output = panel.locator('.jp-OutputArea-output').first();
        let runAt = 0;
        // Typed as a person would; once more if the first keystrokes were lost to focus changes
        // while the Lab was still laying out.
        for (let attempt = 1; ; attempt++) {
            await editor.click();
            await page.keyboard.press('Control+A');
            await page.keyboard.type('print(6*7)');
            await waitFor(async () => (await editor.innerText()).trim() === 'print(6*7)', {
                timeout: 5000, expected: `the cell to hold print(6*7) in ${label}`, seen: () => editor.innerText(),
            });
            runAt = Date.now();
            await page.keyboard.press('Shift+Enter');
            const got = await waitFor(async () => (await output.count()) > 0 && (await output.innerText()).trim() === '42', {
                timeout: attempt === 1 ? 10000 : 60000, interval: 250, expected: `the cell's output "42" in ${label}`,
                seen: async () => JSON.stringify({
                    outputs: await page.locator('.jp-OutputArea-output').allInnerTexts(),
                    prompt: await panel.locator('.jp-InputPrompt').first().innerText().catch(() => null),
                    kernel: await panel.locator('.jp-Notebook-ExecutionIndicator').first().getAttribute('data-status').catch(() => null),
                }),
            }).catch(async (e) => {
                await page.screenshot({ path: path.join(ARTIFACTS, `${label}-attempt-${attempt}.png`) });
                if (attempt >= 2) throw e;
                note(t, `${label}: no output yet (${e.message}); running the cell again`);
                await panel.locator('.jp-Cell').first().click();
                return null;
            });
            if (got) break;
        }
        timings[`${label}: cell run to output`] = Date.now() - runAt;
        timings[`${label}: total`] = Date.now() - started;
        await page.screenshot({ path: path.join(ARTIFACTS, `${label}.png`) });
        // Shut the notebook's kernel down and remove the notebook (through the proxy, as the page).
        await page.evaluate(async (n) => {
            const xsrf = decodeURIComponent((document.cookie.match(/(?:^|; )_xsrf=([^;]*)/) || [])[1] || '');
            const sessions = await (await fetch('/api/sessions')).json();
            for (const s of sessions) {
                if (s.path === n) await fetch(`/api/sessions/${s.id}`, { method: 'DELETE', headers: { 'X-XSRFToken': xsrf } });
            }
            await fetch(`/api/contents/${encodeURIComponent(n)}`, { method: 'DELETE', headers: { 'X-XSRFToken': xsrf } });
        }, name).catch((e) => note(t, `${label}: clean-up through the API failed: ${e.message}`));
        note(t, `${label}: logged in, print(6*7) → 42 after ${secs(timings[`${label}: cell run to output`])} (total ${secs(timings[`${label}: total`])})`);
    } finally {
        await page.close().catch(() => {});
    }
}

/** The Guacamole shell in Chromium at `base`: token, tunnel, a typed command echoed by the real shell. */
async function guacamoleFlow(t, base, label, tokenVia) {
    const started = Date.now();
    const r = await tokenVia(`username=${S.info.user}&password=${S.info.password}`);
    assert.equal(r.status, 200, `expected 200 from POST /guacamole/api/tokens through the proxy, saw ${r.status}: ${r.text}`);
    const tok = JSON.parse(r.text).authToken;
    assert.match(tok || '', /^[0-9A-F]{64}$/, `expected an authToken, saw ${r.text}`);
    const mark = readEvents().length;
    const page = await newPage(label);
    let conn;
    const word = `hello-through-the-uap-${label}`;
    try {
        await page.goto(`${base}/guacamole/#/client/${SHELL_ID}?token=${tok}`);
        await waitFor(() => page.evaluate(() => window.exoGuac && window.exoGuac.state === 'connected'), {
            timeout: 30000, expected: `exoGuac.state === 'connected' (${label})`,
            seen: () => page.evaluate(() => JSON.stringify(window.exoGuac ? { state: window.exoGuac.state, lastError: window.exoGuac.lastError } : 'no exoGuac')).catch((e) => e.message),
        });
        timings[`${label}: link to connected`] = Date.now() - started;
        conn = await waitFor(() => {
            const hs = readEvents().slice(mark).find((e) => e.event === 'handshake' && e.protocol === 'ssh');
            return hs && hs.conn;
        }, { expected: 'an ssh handshake at the peer', seen: () => JSON.stringify(readEvents().slice(mark).slice(-5)) });
        await waitFor(() => eventsOf(conn, 'upstream_connected')[0], { timeout: 15000, expected: 'the peer connected to sshd', seen: () => JSON.stringify(eventsOf(conn).slice(-5)) });
        await sleep(1500); // the prompt
        await page.click('#display', { position: { x: 200, y: 200 } }).catch(() => {});
        await page.keyboard.type(`echo ${word}`, { delay: 20 });
        await page.keyboard.press('Enter');
        const typed = await waitFor(() => eventsOf(conn, 'typed').find((e) => e.submitted), {
            timeout: 10000, expected: `the peer's "typed" event for ${conn}`, seen: () => JSON.stringify(eventsOf(conn, 'typed')),
        });
        assert.equal(typed.text, `echo ${word}`, `expected "echo ${word}" typed, saw ${JSON.stringify(typed.text)}`);
        await sleep(1000);
        await page.screenshot({ path: path.join(ARTIFACTS, `${label}.png`) });
    } finally {
        await page.close().catch(() => {});
    }
    const end = await waitFor(() => eventsOf(conn, 'disconnect')[0], { timeout: 10000, expected: `the peer's "disconnect" for ${conn}`, seen: () => JSON.stringify(eventsOf(conn).slice(-5)) });
    const screen = end.screen || [];
    assert.ok(screen.some((l) => l.trim() === word), `expected a line that is exactly "${word}" (the shell's output), saw screen ${JSON.stringify(screen)}`);
    timings[`${label}: total`] = Date.now() - started;
    note(t, `${label}: token, tunnel, "echo ${word}" answered by the shell (${secs(timings[`${label}: total`])})`);
}

// ---------------------------------------------------------------------------------------------
// The tests

test('the proxy: production host parsing, headers, CORS, OPTIONS answered by the proxy itself', async (t) => {
    const host = uapHost(IP.echo, S.echoPort, 'http');
    const origin = 'http://localhost:8000'; // one of production's allowed origins, kept verbatim
    const r = await uapRequest('prod', host, '/some/path?a=1&b=%20x', { headers: { Origin: origin } });
    assert.equal(r.status, 200, `expected 200 through the proxy, saw ${r.status}: ${r.text}`);
    const seen = JSON.parse(r.text);
    assert.equal(seen.url, '/some/path?a=1&b=%20x', `expected the path and query unchanged, saw ${seen.url}`);
    assert.equal(seen.headers.host, host, `expected Host = the proxy hostname ($host), saw ${seen.headers.host}`);
    assert.equal(seen.headers['x-forwarded-proto'], 'https', `expected X-Forwarded-Proto https, saw ${seen.headers['x-forwarded-proto']}`);
    assert.equal(seen.headers['x-forwarded-for'], undefined, `expected no X-Forwarded-For (production sets none), saw ${seen.headers['x-forwarded-for']}`);
    assert.equal(seen.headers.connection, 'upgrade', `expected Connection "upgrade" (production sets it on every request), saw ${seen.headers.connection}`);
    assert.equal(r.headers['access-control-allow-origin'], origin, `expected the allowed origin echoed, saw ${r.headers['access-control-allow-origin']}`);
    assert.equal(r.headers['access-control-allow-credentials'], 'true');
    // Case-insensitive hostname (the maps are ~*), upper-case protocol prefix.
    const upper = await uapRequest('prod', host.toUpperCase(), '/upper');
    assert.equal(upper.status, 200, `expected the upper-case hostname to work (~* maps), saw ${upper.status}`);

    const before = S.echoSeen.length;
    const pre = await uapRequest('prod', host, '/preflight', { method: 'OPTIONS', headers: { Origin: origin, 'Access-Control-Request-Method': 'POST' } });
    assert.equal(pre.status, 204, `expected every OPTIONS answered 204 by the proxy, saw ${pre.status}`);
    assert.equal(pre.headers['access-control-allow-origin'], origin);
    assert.equal(pre.headers['access-control-allow-methods'], 'GET, POST, OPTIONS, HEAD');
    assert.equal(pre.headers['access-control-allow-headers'], 'Authorization, Origin, X-Requested-With, Content-Type, Accept, X-Is-Electron');
    assert.equal(S.echoSeen.length, before, `expected the OPTIONS never to reach the instance, saw ${JSON.stringify(S.echoSeen.slice(before))}`);
    const other = await uapRequest('prod', host, '/x', { headers: { Origin: 'https://evil.example' } });
    assert.equal(other.headers['access-control-allow-origin'], undefined, `expected no Allow-Origin for an origin production does not allow, saw ${other.headers['access-control-allow-origin']}`);
    // An address outside the proxy's network: no octet from the maps, no upstream.
    const outside = await uapRequest('prod', `http-10-0-0-1-${S.echoPort}.uap.test`, '/');
    assert.ok(outside.status >= 500, `expected an address outside 127.0.0.0/24 not to be proxied, saw ${outside.status}`);
    note(t, `Host ${seen.headers.host}, X-Forwarded-Proto ${seen.headers['x-forwarded-proto']}; OPTIONS → 204 at the proxy; outside the network → ${outside.status}`);
});

test('JupyterLab through the UAP (http- form, plain HTTP to the agent\'s front): log in with the passphrase, run a cell, see 42', { timeout: 180000 }, async (t) => {
    const host = uapHost(IP.jupyter, S.jport, 'http');
    const before = accessLog().length;
    await jupyterFlow(t, `https://${host}`, 'jupyterlab-http');
    // nginx logs an upgraded connection when it ends (the page is closed by now).
    await waitFor(() => accessLog().slice(before).some((l) => l.includes(`"${host}"`) && / 101 /.test(l) && l.includes('/channels')), {
        timeout: 15000, expected: "the kernel WebSocket (101 on /api/kernels/…/channels) in the proxy's access log",
        seen: () => JSON.stringify(accessLog().slice(before).slice(-5)),
    });
});

/**
 * Exosphere's `parseConsoleLogForWorkflowToken` (src/Helpers/Helpers.elm): per line, what follows
 * the first `{`, decoded whole as an object with a string `exoWorkflowToken`; the last wins.
 */
function exosphereWorkflowToken(consoleText) {
    let found = null;
    for (const line of consoleText.split('\n')) {
        const at = line.indexOf('{');
        try {
            const value = JSON.parse(at < 0 ? line : line.slice(at));
            if (value && typeof value.exoWorkflowToken === 'string') found = value.exoWorkflowToken;
        } catch { /* not a token line */ }
    }
    return found;
}

/** Exosphere's `buildProxyUrl` (src/Helpers/Url.elm), as its workflow link calls it. */
function buildProxyUrl(proxyHostname, ip, port, urlPath, httpsUpstream) {
    return `https://${httpsUpstream ? '' : 'http-'}${ip.replaceAll('.', '-')}-${port}.${proxyHostname}${urlPath}`;
}

test('Exosphere\'s notebook link: the token from the agent\'s console, linked as Exosphere links it, opens JupyterLab logged in', { timeout: 120000 }, async (t) => {
    // The sandbox writes its console lines to stdout (agent.log). The link's path is
    // exoCustomWorkflow's "/lab" (its value is checked against real Nova in
    // agent/tests/openstack.rs); Exosphere appends "/?token=".
    const token = exosphereWorkflowToken(fs.readFileSync(path.join(ARTIFACTS, 'agent.log'), 'utf8'));
    assert.match(token || '', /^[0-9a-f]{48}$/, `expected an exoWorkflowToken line in the agent's console output, saw ${token}`);
    const link = buildProxyUrl(S.uapInfo.domain, IP.jupyter, 8888, `/lab/?token=${token}`, false);
    // No session from the passphrase tests: only the token can log this browser in. Pages are
    // closed before cookies are cleared: a live JupyterLab page keeps calling the API with the
    // token, and Jupyter Server answers a token-authenticated request with a fresh login cookie.
    const fresh = async () => {
        for (const open of S.context.pages()) await open.close();
        await S.context.clearCookies();
    };
    await fresh();
    const page = await newPage('exosphere-link');
    try {
        await page.goto(link);
        await page.locator('#jp-main-dock-panel').waitFor({ timeout: 60000 });
        assert.doesNotMatch(page.url(), /\/login/, `expected JupyterLab itself, not its login page: ${page.url()}`);
        const api = await page.evaluate(async () => (await fetch('/api/status')).status);
        assert.equal(api, 200, `expected the session the token opened to reach the API, saw ${api}`);
        note(t, `${link.replace(token, '<token>')} → ${new URL(page.url()).pathname}, logged in`);
    } finally {
        await fresh();
    }
    // A wrong token gets the login page, not the lab.
    const wrong = await newPage('exosphere-link-wrong');
    try {
        await wrong.goto(buildProxyUrl(S.uapInfo.domain, IP.jupyter, 8888, `/lab/?token=${'0'.repeat(48)}`, false));
        await wrong.waitForURL(/\/login/, { timeout: 30000 });
    } finally {
        await fresh();
    }
});

test('Guacamole shell through the UAP (http- form): token, tunnel, typed command echoed', { timeout: 120000 }, async (t) => {
    const host = uapHost(IP.guac, S.gport, 'http');
    const before = accessLog().length;
    await guacamoleFlow(t, `https://${host}`, 'guacamole-http', (body) => uapRequest('prod', host, '/guacamole/api/tokens', {
        method: 'POST', headers: { 'Content-Type': 'application/x-www-form-urlencoded' }, body,
    }));
    await waitFor(() => accessLog().slice(before).some((l) => l.includes(`"${host}"`) && / 101 /.test(l)), {
        timeout: 15000, expected: "the tunnel WebSocket (101) in the proxy's access log",
        seen: () => JSON.stringify(accessLog().slice(before).slice(-5)),
    });
});

test('JupyterLab through the UAP, default https form: the agent\'s own front terminates TLS on the instance', { timeout: 180000 }, async (t) => {
    const f = { ip: IP.jupyter, port: S.jport };
    const host = uapHost(f.ip, f.port);
    const before = accessLog().length;
    await jupyterFlow(t, `https://${host}`, 'jupyterlab-https');
    await waitFor(() => accessLog().slice(before).some((l) => l.includes(`"${host}"`) && / 101 /.test(l) && l.includes('/channels') && l.includes(`upstream=${f.ip}:${f.port}`)), {
        timeout: 15000, expected: `the kernel WebSocket through the front (101, upstream ${f.ip}:${f.port}) in the proxy's access log`,
        seen: () => JSON.stringify(accessLog().slice(before).slice(-5)),
    });
});

test('Guacamole shell through the UAP, default https form: the exoagent front terminates TLS', { timeout: 120000 }, async (t) => {
    const f = front('guac');
    const host = uapHost(f.ip, f.port);
    const before = accessLog().length;
    await guacamoleFlow(t, `https://${host}`, 'guacamole-https', (body) => uapRequest('prod', host, '/guacamole/api/tokens', {
        method: 'POST', headers: { 'Content-Type': 'application/x-www-form-urlencoded' }, body,
    }));
    await waitFor(() => accessLog().slice(before).some((l) => l.includes(`"${host}"`) && / 101 /.test(l) && l.includes(`upstream=${f.ip}:${f.port}`)), {
        timeout: 15000, expected: `the tunnel WebSocket through the front (101, upstream ${f.ip}:${f.port}) in the proxy's access log`,
        seen: () => JSON.stringify(accessLog().slice(before).slice(-5)),
    });
});

test('proxy_ssl_verify on: the pinned instance certificate works; a wrong pin fails closed (502)', async (t) => {
    const f = front('jupyter');
    const host = uapHost(f.ip, f.port);
    const ok = await uapRequest('verify', host, '/api');
    assert.equal(ok.status, 200, `expected 200 from JupyterLab's /api with the instance certificate pinned, saw ${ok.status}: ${ok.text.slice(0, 300)}`);
    assert.match(ok.text, /"version"/, `expected JupyterLab's /api answer, saw ${ok.text.slice(0, 300)}`);
    const wrong = await uapRequest('wrong', host, '/api');
    assert.equal(wrong.status, 502, `expected 502 with a wrong pin, saw ${wrong.status}: ${wrong.text.slice(0, 300)}`);
    const log = tail(S.uapInfo.error_log, 20000);
    assert.match(log, /upstream SSL certificate verify error/, 'expected nginx to log the verification failure');
    // The plain-HTTP form to the same front still works (TLS not required there).
    const plain = await uapRequest('verify', uapHost(f.ip, f.port, 'http'), '/api');
    assert.equal(plain.status, 200, `expected the http- form to the same front port to work (plain HTTP accepted), saw ${plain.status}`);
    note(t, `pinned ${S.pki.instance.sha256.slice(0, 23)}… → 200; wrong pin → 502; http- form on the same port → 200`);
});

test('the agent\'s generated certificate: its published fingerprint is what the UAP pins, and the pin works', async (t) => {
    const want = crypto.createHash('sha256').update(new crypto.X509Certificate(fs.readFileSync(S.agentCert)).raw).digest('hex');
    assert.equal(S.status.tls && S.status.tls.fingerprint, want, `expected exoagent status --json to publish the SHA-256 of ${S.agentCert}, saw ${JSON.stringify(S.status.tls)}`);
    const host = uapHost(IP.jupyter, S.jport);
    const ok = await uapRequest('agent-pin', host, '/api');
    assert.equal(ok.status, 200, `expected 200 with the agent's certificate pinned (nginx's default proxy_ssl_name), saw ${ok.status}: ${ok.text.slice(0, 200)}\n${tail(S.uapInfo.error_log, 1500)}`);
    const wrong = await uapRequest('wrong', host, '/api');
    assert.equal(wrong.status, 502, `expected 502 with another certificate pinned, saw ${wrong.status}`);
    note(t, `fingerprint ${want.slice(0, 16)}… published and pinned → 200; another pin → 502`);
});

test('mutual TLS required: nginx with the UAP client certificate works, clients without it are refused', async (t) => {
    const f = front('mutual');
    const host = uapHost(f.ip, f.port);
    const ok = await uapRequest('mutual', host, '/api');
    assert.equal(ok.status, 200, `expected 200 through nginx presenting the UAP client certificate, saw ${ok.status}: ${ok.text.slice(0, 300)}`);
    assert.match(ok.text, /"version"/);
    // The production-like server (no client certificate) cannot reach it.
    const noCert = await uapRequest('verify', host, '/api');
    assert.equal(noCert.status, 502, `expected 502 from nginx without a client certificate, saw ${noCert.status}`);
    // Straight to the front: no certificate, a certificate of another CA → no HTTP answer.
    for (const [what, extra] of [['no client certificate', {}],
        ['a client certificate from another CA', { cert: fs.readFileSync(S.pki.otherClient.cert), key: fs.readFileSync(S.pki.otherClient.key) }]]) {
        const outcome = await directRequest(f.ip, f.port, '/api', { ca: fs.readFileSync(S.pki.instance.cert), servername: undefined, checkServerIdentity: () => undefined, ...extra })
            .then((r) => `HTTP ${r.status}`, (e) => `refused: ${e.code || e.message}`);
        assert.match(outcome, /^refused/, `expected ${what} to be refused during the handshake, saw ${outcome}`);
        note(t, `${what}: ${outcome}`);
    }
    const withCert = await directRequest(f.ip, f.port, '/api', {
        ca: fs.readFileSync(S.pki.instance.cert), checkServerIdentity: () => undefined,
        cert: fs.readFileSync(S.pki.client.cert), key: fs.readFileSync(S.pki.client.key),
    });
    assert.equal(withCert.status, 200, `expected the UAP client certificate to be accepted directly too, saw ${withCert.status}`);
    // --require-tls: plain HTTP gets a clear refusal.
    const plain = await directRequest(f.ip, f.port, '/api');
    assert.equal(plain.status, 400, `expected plain HTTP refused with 400 on a TLS-only front, saw ${plain.status}: ${plain.text}`);
    assert.match(plain.text, /requires TLS/, `expected the refusal to say TLS is required, saw ${plain.text}`);
    note(t, `nginx + UAP client cert → 200; nginx without → 502; plain → 400 "${plain.text.trim()}"`);
});

test('teardown: nothing left running, nothing listened outside loopback, no secret in the logs', { timeout: 120000 }, async (t) => {
    // Every listening socket of the processes this file started is on loopback.
    const jl = S.status.services.find((x) => x.service === 'jupyterlab');
    const pids = new Set([S.uapInfo.pid, ...S.fronts.map((f) => f.proc.child.pid), S.web.child.pid, jl.pid, jl.front.pid]);
    for (const p of processes({ needle: S.uapInfo.dir })) pids.add(Number(p.split(' ')[0]));
    const ss = spawnSync('ss', ['-Hltnp'], { encoding: 'utf8' });
    const ours = ss.stdout.split('\n').filter((l) => [...pids].some((pid) => l.includes(`pid=${pid},`)));
    assert.ok(ours.length >= 6, `expected ss to show the proxy's, the fronts' and JupyterLab's listening sockets, saw ${JSON.stringify(ours)}`);
    const outside = ours.filter((l) => !/\s127\.\d+\.\d+\.\d+:\d+\s/.test(l));
    assert.deepEqual(outside, [], 'expected every listening socket of the run on 127.0.0.0/8');
    const report = await teardown();
    for (const f of ['guacamole-web.log', 'front-jupyter.log', 'front-guac.log', 'front-mutual.log', 'nginx-access.log', 'nginx-error.log']) {
        const text = tail(path.join(ARTIFACTS, f), 10_000_000);
        assert.ok(!text.includes(S.info.password) && !text.includes(S.passphrase), `expected no passphrase in ${f}`);
    }
    assert.deepEqual(report.problems, [], `expected a clean teardown, saw: ${report.problems.join('; ')}`);
    note(t, `timings: ${JSON.stringify(Object.fromEntries(Object.entries(timings).map(([k, v]) => [k, secs(v)])))}`);
});
