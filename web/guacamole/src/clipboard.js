// Owns the clipboard in both directions: remote → panel (+ local clipboard), panel/paste → remote.
import Guacamole from 'guacamole-common-js';
import { exo } from './state.js';
import { readText, writeText } from './text-stream.js';

const INPUT_DEBOUNCE_MS = 400;

/**
 * @param {object} p
 * @param {HTMLTextAreaElement} p.textarea the clipboard panel's text field
 * @param {() => (Guacamole.Client | null)} p.getClient
 */
export function setupClipboard({ textarea, getClient }) {
    /** text the user provided locally (panel, paste, local clipboard); sent to new sessions too */
    let localText = null;
    /** last text known to be on the remote clipboard (sent or received), per client */
    let remoteText = null;

    /** Sends text to the remote clipboard as a text/plain clipboard stream. */
    function sendToRemote(text) {
        localText = text;
        const client = getClient();
        if (!client || text === remoteText)
            return;
        // Real UTF-8 (Guacamole.StringWriter 1.5 encodes each half of a surrogate pair alone).
        writeText(client.createClipboardStream('text/plain'), text);
        remoteText = text;
    }

    /** Text arrived from the remote clipboard. */
    function receivedFromRemote(text) {
        remoteText = text;
        exo.clipboard = text;
        textarea.value = text;
        if (navigator.clipboard && navigator.clipboard.writeText && document.hasFocus())
            navigator.clipboard.writeText(text).catch(() => { /* not allowed: the panel still has it */ });
    }

    // Panel edits.
    let inputTimer = null;
    textarea.addEventListener('input', () => {
        clearTimeout(inputTimer);
        inputTimer = setTimeout(() => sendToRemote(textarea.value), INPUT_DEBOUNCE_MS);
    });
    textarea.addEventListener('change', () => {
        clearTimeout(inputTimer);
        sendToRemote(textarea.value);
    });

    // Paste anywhere on the page (into the panel, or via the browser's Edit menu elsewhere).
    document.addEventListener('paste', (event) => {
        if (event.target === textarea) {
            setTimeout(() => sendToRemote(textarea.value), 0);
            return;
        }
        const text = event.clipboardData && event.clipboardData.getData('text/plain');
        if (text) {
            event.preventDefault();
            textarea.value = text;
            sendToRemote(text);
        }
    });

    // When the window regains focus, pick up the local clipboard if the browser already allows it
    // (never triggers a permission prompt).
    window.addEventListener('focus', async () => {
        try {
            if (!navigator.permissions || !navigator.clipboard || !navigator.clipboard.readText)
                return;
            const permission = await navigator.permissions.query({ name: 'clipboard-read' });
            if (permission.state !== 'granted')
                return;
            const text = await navigator.clipboard.readText();
            if (text && text !== localText && text !== remoteText) {
                textarea.value = text;
                sendToRemote(text);
            }
        } catch {
            // clipboard-read is not a known permission in every browser
        }
    });

    return {
        /** Wires a new client; re-sends text the user set locally before a reconnect. */
        attach(client) {
            remoteText = null;
            client.onclipboard = (stream, mimetype) => {
                if (/^text\//.test(mimetype)) {
                    // guacd cuts clipboard data into 4096-byte blobs, possibly inside a character.
                    readText(stream, { onend: receivedFromRemote });
                } else {
                    // Non-text clipboard data (e.g. images) is read and dropped.
                    new Guacamole.BlobReader(stream, mimetype);
                }
            };
        },

        /** Called when a client reaches "connected". */
        connected() {
            if (localText !== null)
                sendToRemote(localText);
        },

        sendToRemote,
    };
}
