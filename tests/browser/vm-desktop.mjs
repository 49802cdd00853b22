// Chromium against a VM's Guacamole, as Exosphere opens it: run by tests/vm/vm_test.py (the
// `exosphere-desktop-debian11` scenario) once the console says `complete`. Not a node:test file.
//
//   EXOAGENT_VM_GUAC_URL=http://127.0.0.1:PORT EXOAGENT_VM_GUAC_PASSPHRASE=… node tests/browser/vm-desktop.mjs
//
// The URL stands for `https://http-<ip>-49528.<uap host>` (the VM's Guacamole port, forwarded);
// the passphrase is the one in os-server-password (in the environment, never in argv).
// EXOAGENT_VM_GUAC_USER (default exouser); EXOAGENT_VM_GUAC_TOGETHER=1 opens the desktop and
// the shell links at the same time instead of one after the other; EXOAGENT_TEST_ARTIFACTS (default
// target/test-artifacts, relative to the repository): screenshots go to its vm-desktop-*.png.
//
// 1. POST /guacamole/api/tokens as Exosphere does (raw spaces; retried every 15 s, as Exosphere
//    retries, for up to 2 min), 2. the desktop link `#/client/<desktop id>?token=…`: state
//    `connected` and the Xfce desktop drawn (> 64 distinct colours on the flattened display),
//    screenshots saved, 3. the shell link: `clear; echo exo$((6*7)) | tee ~/<marker>` typed with
//    the keyboard, then the terminal's first row selected with the mouse: guacd copies the
//    selection to the page's clipboard, which must be exactly `exo42` (the shell's output, as
//    drawn on the terminal). The caller checks the marker file over SSH.
//
// Prints one JSON line: epoch milliseconds of each step (`token`, `desktop_connected`,
// `desktop_drawn`, `shell_connected`, `shell_echoed`), the token attempts, the desktop's size and
// colours, the marker's name. Exits 1 with the reason on stderr.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { CHROMIUM, CHROMIUM_ARGS, VIEWPORT } from './chromium.mjs';
import {
    DESKTOP_ID, SHELL_ID, displayStats, pageState, postToken, saveDisplay, secs, settle, sleep, waitFor,
} from './guac-page.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '../..');
const ARTIFACTS = path.resolve(REPO, process.env.EXOAGENT_TEST_ARTIFACTS || 'target/test-artifacts');
const BASE = (process.env.EXOAGENT_VM_GUAC_URL || '').replace(/\/$/, '');
const PASSPHRASE = process.env.EXOAGENT_VM_GUAC_PASSPHRASE || '';
const USER = process.env.EXOAGENT_VM_GUAC_USER || 'exouser';
const EXPECTED = 'exo42';
// Both links opened at once (bench/vm-desktop.py: each step timed from the token, neither
// waiting for the other), rather than the desktop first.
const TOGETHER = process.env.EXOAGENT_VM_GUAC_TOGETHER === '1';

const T0 = Date.now();
const out = { marker: `exo-shell-${crypto.randomBytes(4).toString('hex')}` };
let context = null;
let udd = null;

function note(msg) {
    process.stderr.write(`# [${secs(Date.now() - T0)}] ${msg}\n`);
}

async function token() {
    let last = '';
    for (let attempt = 1; attempt <= 9; attempt++) {
        out.token_attempts = attempt;
        try {
            const r = await postToken(BASE, USER, PASSPHRASE);
            const text = await r.text();
            if (r.status === 200) {
                const tok = JSON.parse(text).authToken;
                if (typeof tok === 'string' && /^[0-9A-F]{64}$/.test(tok)) return tok;
            }
            last = `${r.status} ${text.slice(0, 200)}`;
        } catch (e) {
            last = e.cause ? e.cause.code || e.message : e.message;
        }
        note(`token attempt ${attempt}: ${last}`);
        await sleep(15000);
    }
    throw new Error(`POST ${BASE}/guacamole/api/tokens never gave a token; last: ${last}`);
}

async function openClient(id, tok, label) {
    const page = await context.newPage();
    page.on('pageerror', (e) => note(`${label}: page error: ${e.message}`));
    page.on('console', (m) => {
        if (m.type() === 'error' || m.type() === 'warning') note(`${label}: console ${m.type()}: ${m.text()}`);
    });
    await page.goto(`${BASE}/guacamole/#/client/${id}?token=${tok}`);
    await waitFor(() => page.evaluate(() => window.exoGuac && window.exoGuac.state === 'connected'), {
        timeout: 60000, interval: 250,
        expected: `exoGuac.state === 'connected' for ${label}`,
        seen: () => pageState(page).then(JSON.stringify),
    });
    return page;
}

async function desktop(tok) {
    const page = await openClient(DESKTOP_ID, tok, 'desktop');
    out.desktop_connected = Date.now();
    note(`desktop connected after ${secs(out.desktop_connected - T0)}`);
    // Xfce draws wallpaper, panel and icons: many colours, unlike Xvnc's black screen.
    const stats = await waitFor(async () => {
        const s = await displayStats(page);
        return s.colours > 64 ? s : null;
    }, {
        timeout: 300000, interval: 500,
        expected: 'the display to show the Xfce desktop (> 64 distinct colours)',
        seen: async () => JSON.stringify({ display: await displayStats(page).catch((e) => e.message), page: await pageState(page) }),
    });
    out.desktop_drawn = Date.now();
    out.desktop = { width: stats.width, height: stats.height, colours: stats.colours };
    note(`desktop drawn after ${secs(out.desktop_drawn - T0)}: ${stats.width}x${stats.height}, ${stats.colours} colours`);
    await sleep(2500); // let the panel and icons finish drawing
    await settle(page, 1000, 15000);
    await page.screenshot({ path: path.join(ARTIFACTS, 'vm-desktop.png') });
    await saveDisplay(page, path.join(ARTIFACTS, 'vm-desktop-display.png'));
    const state = await pageState(page);
    if (state.state !== 'connected') throw new Error(`the desktop session did not stay connected: ${JSON.stringify(state)}`);
    await page.close();
}

/** Drags the mouse along the terminal's first row: guacd selects it and sends the selection to
 * the page as clipboard data. Returns what the page's clipboard then holds. */
async function selectFirstRow(page) {
    const { left, top, scale, width } = await page.evaluate(() => {
        const d = window.exoGuac.client.getDisplay();
        const r = d.getElement().getBoundingClientRect();
        return { left: r.left, top: r.top, scale: d.getScale(), width: d.getWidth() };
    });
    const y = top + 5 * scale;
    await page.mouse.move(left + 2 * scale, y);
    await page.mouse.down();
    await page.mouse.move(left + (width - 4) * scale, y, { steps: 10 });
    await page.mouse.up();
    await sleep(1000);
    return page.evaluate(() => window.exoGuac.clipboard);
}

async function shell(tok) {
    const page = await openClient(SHELL_ID, tok, 'shell');
    out.shell_connected = Date.now();
    note(`shell connected after ${secs(out.shell_connected - T0)}`);
    // The prompt is drawn: text on the terminal background.
    await waitFor(async () => (await displayStats(page)).colours > 4, {
        timeout: 60000, interval: 250, expected: 'a shell prompt on the display (> 4 colours)',
        seen: async () => JSON.stringify(await displayStats(page)),
    });
    await settle(page, 1000, 15000);
    const typedAt = Date.now();
    await page.keyboard.type(`clear; echo exo$((6*7)) | tee ~/${out.marker}`, { delay: 20 });
    await page.keyboard.press('Enter');
    let clip = null;
    await waitFor(async () => {
        await settle(page, 700, 5000);
        clip = await selectFirstRow(page);
        return typeof clip === 'string' && clip.trim() === EXPECTED;
    }, {
        timeout: 60000, interval: 500,
        expected: `the terminal's first row, selected, to read ${JSON.stringify(EXPECTED)}`,
        seen: async () => JSON.stringify({ clipboard: clip, page: await pageState(page) }),
    });
    out.shell_echoed = Date.now();
    out.shell_clipboard = clip;
    note(`shell echoed ${EXPECTED} ${secs(out.shell_echoed - typedAt)} after typing`);
    await page.screenshot({ path: path.join(ARTIFACTS, 'vm-shell.png') });
    await saveDisplay(page, path.join(ARTIFACTS, 'vm-shell-display.png'));
    await page.close();
}

async function main() {
    if (!BASE || !PASSPHRASE) throw new Error('EXOAGENT_VM_GUAC_URL and EXOAGENT_VM_GUAC_PASSPHRASE are required');
    if (!fs.existsSync(CHROMIUM)) throw new Error(`expected Chromium at ${CHROMIUM}: run bash tests/browser/setup.sh`);
    fs.mkdirSync(ARTIFACTS, { recursive: true });
    udd = fs.mkdtempSync(path.join(os.tmpdir(), 'exoagent-chromium-'));
    context = await chromium.launchPersistentContext(udd, {
        executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, viewport: VIEWPORT,
    });
    for (const p of context.pages()) await p.close();
    const tok = await token();
    out.token = Date.now();
    note(`token after ${secs(out.token - T0)} (${out.token_attempts} attempt(s))`);
    if (TOGETHER) {
        await Promise.all([desktop(tok), shell(tok)]);
    } else {
        await desktop(tok);
        await shell(tok);
    }
}

function cleanup() {
    if (udd) fs.rmSync(udd, { recursive: true, force: true });
}

process.once('SIGTERM', () => {
    cleanup();
    process.exit(143);
});

try {
    await main();
    process.stdout.write(`${JSON.stringify(out)}\n`);
    process.exitCode = 0;
} catch (e) {
    process.stderr.write(`vm-desktop: ${e.message}\n`);
    process.exitCode = 1;
    // What the pages showed when it failed.
    let n = 0;
    for (const page of context ? context.pages() : []) {
        n += 1;
        await page.screenshot({ path: path.join(ARTIFACTS, `vm-failed-${n}.png`) }).catch(() => {});
    }
} finally {
    if (context) await Promise.race([context.close().catch(() => {}), sleep(10000)]);
    cleanup();
}
