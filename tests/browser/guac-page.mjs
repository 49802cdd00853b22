// Page helpers the Guacamole browser scripts share (guacamole.test.mjs against the rig,
// vm-desktop.mjs against a VM): the connection ids Exosphere's links carry, Exosphere's token
// call, polling, and what the page's Guacamole display shows (window.exoGuac, set by the client
// page in web/guacamole).
import assert from 'node:assert/strict';
import fs from 'node:fs';

// Connection ids as the links carry them: base64 of "<name>\0c\0default".
export const DESKTOP_ID = 'ZGVza3RvcABjAGRlZmF1bHQ='; // padded standard base64, as Exosphere sends
export const SHELL_ID = Buffer.from('shell\0c\0default').toString('base64url'); // unpadded base64url

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export const secs = (ms) => `${(ms / 1000).toFixed(2)} s`;

/** Polls `probe` until it returns a truthy value; fails saying what was expected and last seen. */
export async function waitFor(probe, { timeout = 15000, interval = 100, expected, seen } = {}) {
    const start = Date.now();
    let last;
    for (;;) {
        last = await probe();
        if (last) return last;
        if (Date.now() - start > timeout) {
            const observed = seen ? await seen(last) : JSON.stringify(last);
            throw new assert.AssertionError({
                message: `expected ${expected} within ${secs(timeout)}; saw: ${observed}`,
            });
        }
        await sleep(interval);
    }
}

/** Exactly what Exosphere sends (src/Rest/Guacamole.elm): POST /guacamole/api/tokens with a form
 * body built by concatenation, the passphrase's spaces left raw. */
export async function postToken(base, username, password) {
    return fetch(`${base}/guacamole/api/tokens`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
        body: `username=${username}&password=${password}`,
    });
}

export async function pageState(page) {
    return page.evaluate(() => {
        const g = window.exoGuac;
        return g ? {
            state: g.state, lastError: g.lastError, filesystems: g.filesystems,
            transfers: g.transfers, clipboard: g.clipboard,
            status: document.getElementById('status-text')?.textContent,
            detail: document.getElementById('status-detail')?.textContent,
        } : { exoGuac: 'missing', body: document.body?.dataset.state };
    }).catch((e) => ({ evaluateError: e.message }));
}

/**
 * Flattens the Guacamole display and describes it: size, distinct colours (sampled every 4th
 * pixel in both directions) and an FNV-1a hash of every pixel.
 */
export async function displayStats(page) {
    return page.evaluate(() => {
        const display = window.exoGuac.client.getDisplay();
        const canvas = display.flatten();
        const { width, height } = canvas;
        if (!width || !height) return { width, height, colours: 0, hash: 0 };
        const data = canvas.getContext('2d').getImageData(0, 0, width, height).data;
        const seen = new Set();
        let hash = 0x811c9dc5;
        const words = new Uint32Array(data.buffer, data.byteOffset, data.byteLength / 4);
        for (let i = 0; i < words.length; i++) {
            hash = Math.imul(hash ^ words[i], 0x01000193) >>> 0;
        }
        for (let y = 0; y < height; y += 4) {
            for (let x = 0; x < width; x += 4) seen.add(words[y * width + x]);
        }
        return { width, height, colours: seen.size, hash };
    });
}

/** Saves the flattened remote display (native resolution) as a PNG. */
export async function saveDisplay(page, file) {
    const dataUrl = await page.evaluate(() => window.exoGuac.client.getDisplay().flatten().toDataURL('image/png'));
    fs.writeFileSync(file, Buffer.from(dataUrl.split(',')[1], 'base64'));
}

/** Waits until the display has not changed for `quietMs` (at most `timeout`). */
export async function settle(page, quietMs = 700, timeout = 6000) {
    const start = Date.now();
    let last = await displayStats(page);
    let since = Date.now();
    while (Date.now() - start < timeout) {
        await sleep(150);
        const now = await displayStats(page);
        if (now.hash !== last.hash) {
            last = now;
            since = Date.now();
        } else if (Date.now() - since >= quietMs) {
            break;
        }
    }
    return last;
}
