// bench/file-transfer's browser side: run by run.py in the browser network namespace. Headless
// Chromium (the browser tests' binary and flags) logs in, opens the shell connection, uploads
// FT_FILE as FT_NAME with the page's upload control and downloads it back through the page's
// file browser. Prints one JSON line: {"upload_s", "download_s", "download_sha256"}.
//
// Environment: FT_BASE (http://HOST:PORT of the web side), FT_USER, FT_PASSWORD, FT_HOME (the
// user's home, where uploads land), FT_FILE, FT_NAME, FT_SIZE; FT_PATH=blobs makes the page use
// the WebSocket blob path even where the HTTP stream endpoints are offered.
import crypto from 'node:crypto';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { CHROMIUM, CHROMIUM_ARGS, VIEWPORT } from '../../tests/browser/chromium.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
// playwright-core as the browser tests install it (tests/browser/setup.sh).
const { chromium } = createRequire(path.join(HERE, '../../tests/browser/package.json'))('playwright-core');

const env = (k) => {
    const v = process.env[k];
    if (!v) throw new Error(`${k} is not set`);
    return v;
};
const BASE = env('FT_BASE');
const SHELL_ID = Buffer.from('shell\0c\0default').toString('base64url');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A transfer that takes longer fails the run (4 MiB at 50 ms took about 100 s before the page
// moved files over HTTP).
const TRANSFER_TIMEOUT = 900_000;

/** Throws when the page's session is no longer connected (a lost tunnel spoils the figure). */
async function connected(page) {
    const state = await page.evaluate(() => ({ state: window.exoGuac.state, error: window.exoGuac.lastError }));
    if (state.state !== 'connected') throw new Error(`the page left the connected state: ${JSON.stringify(state)}`);
}

async function until(probe, what, timeout = TRANSFER_TIMEOUT, interval = 20) {
    const start = Date.now();
    for (;;) {
        const v = await probe();
        if (v) return v;
        if (Date.now() - start > timeout) throw new Error(`timed out waiting for ${what}`);
        await sleep(interval);
    }
}

async function main() {
    const r = await fetch(`${BASE}/guacamole/api/tokens`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
        body: `username=${env('FT_USER')}&password=${env('FT_PASSWORD')}`,
    });
    if (r.status !== 200) throw new Error(`login: ${r.status} ${await r.text()}`);
    const token = (await r.json()).authToken;

    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'exo-ft-chromium-'));
    const name = env('FT_NAME');
    const size = Number(env('FT_SIZE'));
    // The upload control takes a path; the browser names the file after it.
    const local = path.join(dir, name);
    fs.linkSync(env('FT_FILE'), local);
    const context = await chromium.launchPersistentContext(path.join(dir, 'profile'), {
        executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, viewport: VIEWPORT, acceptDownloads: true,
    });
    try {
        const page = await context.newPage();
        await page.goto(`${BASE}/guacamole/#/client/${SHELL_ID}?token=${token}`);
        await until(() => page.evaluate(() => window.exoGuac && window.exoGuac.state === 'connected'
            && window.exoGuac.filesystems.length > 0), 'the page connected with a filesystem', 60_000, 100);

        if (process.env.FT_PATH === 'blobs') {
            // The old path for comparison: the page moves files as blobs over the WebSocket, as
            // it does when the web side does not offer the HTTP stream endpoints.
            await page.evaluate(() => { window.exoGuac.httpStreams = false; });
        }
        const upStart = performance.now();
        await page.setInputFiles('#file-input', local);
        const up = await until(async () => {
            await connected(page);
            return page.evaluate((n) => window.exoGuac.transfers.find((x) => x.name === n
                && x.state !== 'active' && x.state !== 'pending'), name);
        }, 'the upload');
        const uploadS = (performance.now() - upStart) / 1000;
        if (up.state !== 'done') throw new Error(`upload ended ${JSON.stringify(up)}`);

        await page.click('#menu-handle');
        const panel = page.locator('#files-panel');
        await panel.waitFor({ state: 'visible', timeout: 10_000 });
        for (const part of env('FT_HOME').split('/').filter(Boolean)) {
            const esc = part.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
            await panel.locator('button.fs-folder', { hasText: new RegExp(`^${esc}/$`) }).click({ timeout: 60_000 });
            await until(async () => (await panel.locator('.fs-path').innerText()).endsWith(`/${part}`), `folder ${part}`, 60_000, 50);
        }
        const file = panel.locator('button.fs-file', { hasText: name });
        await file.waitFor({ timeout: 60_000 });
        const downStart = performance.now();
        let done = false;
        const watch = (async () => {
            while (!done) {
                await connected(page);
                await sleep(200);
            }
        })();
        const [download] = await Promise.race([
            Promise.all([page.waitForEvent('download', { timeout: TRANSFER_TIMEOUT }), file.click()]),
            watch.then(() => new Promise(() => {})),
        ]).finally(() => { done = true; });
        const saved = await download.path();
        const downloadS = (performance.now() - downStart) / 1000;
        const got = fs.readFileSync(saved);
        if (got.length !== size) throw new Error(`downloaded ${got.length} bytes, expected ${size}`);
        const digest = crypto.createHash('sha256').update(got).digest('hex');
        process.stdout.write(`${JSON.stringify({ upload_s: uploadS, download_s: downloadS, download_sha256: digest })}\n`);
    } finally {
        await context.close();
        fs.rmSync(dir, { recursive: true, force: true });
    }
}

main().catch((e) => {
    process.stderr.write(`browser.mjs: ${e.stack || e}\n`);
    process.exit(1);
});
