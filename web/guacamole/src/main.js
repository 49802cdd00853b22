// Entry point: reads the link, then wires the session, display, keyboard, clipboard, files and the menu.
import { filesUnavailableMessage, tunnelUrlFor } from './connect.js';
import { parseClientLocation } from './route.js';
import { BAD_LINK_MESSAGE, NO_TOKEN_MESSAGE } from './status.js';
import { exo, setLastError, setState } from './state.js';
import { releaseFocus, showNotice, showStatus, toggleMenu } from './ui.js';
import { setupDisplay } from './display.js';
import { setupKeyboard } from './keyboard.js';
import { setupClipboard } from './clipboard.js';
import { setupTransfers } from './transfers.js';
import { setupFiles } from './files.js';
import { createSession } from './session.js';
import { resumeAudioOnGesture } from './media.js';
import { watchIdleNotice } from './idle-notice.js';

const $ = (id) => document.getElementById(id);

function fail(state, message) {
    setLastError({ code: null, message, source: 'page' });
    setState(state);
    showStatus(state, { message });
}

function start() {
    const { identifier, token } = parseClientLocation(window.location);
    if (!token) {
        fail('no-token', NO_TOKEN_MESSAGE);
        return;
    }
    if (!identifier) {
        fail('bad-link', BAD_LINK_MESSAGE);
        return;
    }

    exo.connection = identifier.name;
    exo.tunnelUrl = tunnelUrlFor(document.baseURI);
    document.title = `${identifier.name} – Guacamole`;
    $('menu-title').textContent = identifier.name;

    let session = null;
    const getClient = () => (session ? session.getClient() : null);

    const display = setupDisplay({ viewport: $('viewport'), container: $('display'), getClient });
    const clipboard = setupClipboard({ textarea: $('clipboard-text'), getClient });
    const transfers = setupTransfers({ list: $('transfers'), getClient, token });
    const files = setupFiles({ panel: $('files-panel'), transfers });

    /** Opens/closes the one menu; opening (re)loads the file browser's folder. */
    const menu = (open) => {
        const shown = toggleMenu(open);
        if (shown) {
            files.opened();
            $('btn-menu-close').focus();
        } else {
            // Typing goes back to the session.
            releaseFocus();
        }
        return shown;
    };
    const keyboard = setupKeyboard({ getClient, onMenuChord: () => menu() });

    session = createSession({
        token,
        identifier,
        tunnelUrl: exo.tunnelUrl,
        getSize: () => display.currentSize(),
        onClient(client) {
            keyboard.reset();
            display.mount(client);
            clipboard.attach(client);
            transfers.attach(client);
            files.attach(client);
        },
        onConnected() {
            display.fit();
            clipboard.connected();
        },
        onDownloadFailed: (index, reason) => transfers.downloadFailed(index, reason),
    });

    // The menu and its handle.
    $('menu-handle').addEventListener('click', () => menu(true));
    $('btn-menu-close').addEventListener('click', () => menu(false));
    $('btn-upload').addEventListener('click', () => $('file-input').click());
    $('btn-ctrl-alt-del').addEventListener('click', () => keyboard.sendCtrlAltDel());
    const zoomFit = $('zoom-fit');
    const zoomLevel = $('zoom-level');
    const applyZoom = () => {
        zoomLevel.disabled = zoomFit.checked;
        $('zoom-value').textContent = `${zoomLevel.value}%`;
        display.setZoom(zoomFit.checked ? null : Number(zoomLevel.value) / 100);
    };
    zoomFit.addEventListener('change', applyZoom);
    zoomLevel.addEventListener('input', applyZoom);
    $('file-input').addEventListener('change', () => {
        for (const file of $('file-input').files)
            transfers.upload(file);
        $('file-input').value = '';
    });
    const reconnect = () => session.connect({ manual: true });
    $('btn-reconnect').addEventListener('click', reconnect);
    $('overlay-reconnect').addEventListener('click', reconnect);
    $('btn-fullscreen').addEventListener('click', () => {
        if (document.fullscreenElement)
            document.exitFullscreen().catch(() => {});
        else if (document.documentElement.requestFullscreen)
            document.documentElement.requestFullscreen().catch(() => {});
    });

    // Drag and drop onto the display uploads to the connection's default upload folder.
    const viewport = $('viewport');
    let dragDepth = 0;
    viewport.addEventListener('dragenter', (e) => {
        e.preventDefault();
        dragDepth++;
        $('drop-hint').hidden = false;
    });
    viewport.addEventListener('dragleave', () => {
        if (--dragDepth <= 0) {
            dragDepth = 0;
            $('drop-hint').hidden = true;
        }
    });
    viewport.addEventListener('dragover', (e) => {
        e.preventDefault();
        e.dataTransfer.dropEffect = 'copy';
    });
    viewport.addEventListener('drop', (e) => {
        e.preventDefault();
        dragDepth = 0;
        $('drop-hint').hidden = true;
        if (exo.filesUnavailable) {
            showNotice(filesUnavailableMessage(exo.filesUnavailable.status, exo.filesUnavailable.message), 15000);
            return;
        }
        for (const file of e.dataTransfer.files)
            transfers.upload(file);
    });
    // A file dropped anywhere else must not make the browser navigate away from the session.
    document.addEventListener('dragover', (e) => e.preventDefault());
    document.addEventListener('drop', (e) => e.preventDefault());

    // exoagent's warning before it shelves an idle instance.
    const noticeUrl = new URL('api/exoagent/notice', document.baseURI);
    noticeUrl.search = `?token=${encodeURIComponent(token)}`;
    watchIdleNotice($('idle-warning'), noticeUrl.toString());

    window.addEventListener('pagehide', () => session.close());
    resumeAudioOnGesture();
    session.connect();
}

// The link is read once; a different fragment (edited by hand, or another Exosphere link in
// the same tab) starts over with a fresh page.
window.addEventListener('hashchange', () => window.location.reload());

start();
