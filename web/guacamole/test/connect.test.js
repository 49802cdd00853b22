// Tests the tunnel URL and the connect data sent to the server.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { buildConnectString, filesUnavailableMessage, keptItsSize, optimalSize, parseNotice, tunnelUrlFor } from '../src/connect.js';

test('tunnel URL sits next to the page and follows http/https', () => {
    assert.equal(
        tunnelUrlFor('https://http-1-2-3-4-49528.uap.example/guacamole/#/client/c2hlbGwAYwBkZWZhdWx0?token=abc'),
        'wss://http-1-2-3-4-49528.uap.example/guacamole/websocket-tunnel',
    );
    assert.equal(tunnelUrlFor('http://10.0.0.5:49528/guacamole/'), 'ws://10.0.0.5:49528/guacamole/websocket-tunnel');
    assert.equal(tunnelUrlFor('http://h/guacamole/index.html?x=1'), 'ws://h/guacamole/websocket-tunnel');
    assert.equal(tunnelUrlFor('https://proxy/prefix/guacamole/'), 'wss://proxy/prefix/guacamole/websocket-tunnel');
});

test('connect data matches the stock app, field order and encoding included', () => {
    const data = buildConnectString({
        token: 'ABC+/=',
        identifier: { name: 'shell', type: 'c', dataSource: 'default' },
        width: 1280.7,
        height: 800,
        dpi: 96,
        timezone: 'America/New_York',
        audio: ['audio/L8', 'audio/L16'],
        video: [],
        image: ['image/jpeg', 'image/png', 'image/webp'],
    });
    assert.equal(data,
        'token=ABC%2B%2F%3D&GUAC_DATA_SOURCE=default&GUAC_ID=shell&GUAC_TYPE=c'
        + '&GUAC_WIDTH=1280&GUAC_HEIGHT=800&GUAC_DPI=96&GUAC_TIMEZONE=America%2FNew_York'
        + '&GUAC_AUDIO=audio%2FL8&GUAC_AUDIO=audio%2FL16'
        + '&GUAC_IMAGE=image%2Fjpeg&GUAC_IMAGE=image%2Fpng&GUAC_IMAGE=image%2Fwebp');

    // Round trip through a standard form decoder.
    const params = new URLSearchParams(data);
    assert.equal(params.get('token'), 'ABC+/=');
    assert.deepEqual(params.getAll('GUAC_AUDIO'), ['audio/L8', 'audio/L16']);
    assert.deepEqual(params.getAll('GUAC_VIDEO'), []);
});

test('missing timezone and media lists still yield every fixed field', () => {
    const data = buildConnectString({
        token: 't', identifier: { name: 'desktop', type: 'c', dataSource: 'default' }, width: 800, height: 600, dpi: 192,
    });
    assert.equal(data, 'token=t&GUAC_DATA_SOURCE=default&GUAC_ID=desktop&GUAC_TYPE=c&GUAC_WIDTH=800&GUAC_HEIGHT=600&GUAC_DPI=192&GUAC_TIMEZONE=');
});

test('optimal size uses device pixels and scales the DPI', () => {
    assert.deepEqual(optimalSize(1000, 700), { width: 1000, height: 700, dpi: 96 });
    assert.deepEqual(optimalSize(1000.5, 700, 2), { width: 2001, height: 1400, dpi: 192 });
    assert.deepEqual(optimalSize(0, 0, 0), { width: 1, height: 1, dpi: 96 });
});

test('a remote screen that kept its size after a resize is told apart from one that followed', () => {
    // guacd 1.3.0: the X screen stays at its geometry.
    assert.equal(keptItsSize({ width: 1000, height: 600 }, { width: 1280, height: 800 }), true);
    assert.equal(keptItsSize({ width: 1000, height: 600 }, { width: 1000, height: 800 }), true);
    // guacd 1.6 or a terminal: it followed (1 px of rounding allowed).
    assert.equal(keptItsSize({ width: 1000, height: 600 }, { width: 1000, height: 600 }), false);
    assert.equal(keptItsSize({ width: 1001, height: 600 }, { width: 1000, height: 599 }), false);
    // Nothing drawn yet: no verdict.
    assert.equal(keptItsSize({ width: 1000, height: 600 }, { width: 0, height: 0 }), false);
});

test('parseNotice reads the web side\'s display, files and download notices, nothing else', () => {
    assert.deepEqual(parseNotice(['display', 'fixed']), { kind: 'display', resizes: false });
    assert.deepEqual(parseNotice(['display', 'resizes']), { kind: 'display', resizes: true });
    assert.deepEqual(parseNotice(['files', 'unavailable', '515', 'Aborted. See logs.']),
        { kind: 'files-unavailable', status: 515, message: 'Aborted. See logs.' });
    assert.deepEqual(parseNotice(['files', 'unavailable']), { kind: 'files-unavailable', status: null, message: '' });
    assert.deepEqual(parseNotice(['download', '3', 'failed', 'cut short']),
        { kind: 'download-failed', index: 3, reason: 'cut short' });
    assert.deepEqual(parseNotice(['download', '0', 'failed']),
        { kind: 'download-failed', index: 0, reason: 'the download failed' });
    assert.equal(parseNotice(['download', '-1', 'failed', 'x']), null);
    assert.equal(parseNotice(['download', 'x', 'failed', 'x']), null);
    assert.equal(parseNotice(['download', '3', 'done']), null);
    assert.equal(parseNotice(['display', 'maybe']), null);
    assert.equal(parseNotice(['something-newer', 'x']), null);
    assert.equal(parseNotice([]), null);
});

test('filesUnavailableMessage names guacd\'s status and message when there are any', () => {
    assert.match(filesUnavailableMessage(515, 'Aborted. See logs.'), /\(status 515: Aborted\. See logs\.\)\. The desktop works without it\.$/);
    assert.doesNotMatch(filesUnavailableMessage(null, ''), /\(/);
});
