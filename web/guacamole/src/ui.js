// Owns the status overlay, the toolbar status line and panel toggling.

const $ = (id) => document.getElementById(id);

const SHORT = {
    loading: 'Loading',
    'no-token': 'No token',
    'bad-link': 'Bad link',
    connecting: 'Connecting',
    connected: 'Connected',
    reconnecting: 'Reconnecting',
    disconnected: 'Disconnected',
    error: 'Error',
};

/**
 * Shows the state in the toolbar and, unless connected, in the centred overlay.
 * @param {string} state
 * @param {{ message?: string, detail?: string, canReconnect?: boolean }} [info]
 */
export function showStatus(state, { message = '', detail = '', canReconnect = false } = {}) {
    const busy = state === 'connecting' || state === 'reconnecting' || state === 'loading';
    $('status-line').textContent = SHORT[state] || state;
    $('status-line').title = message;
    $('overlay').hidden = state === 'connected';
    $('overlay').classList.toggle('busy', busy);
    $('status-text').textContent = message;
    $('status-detail').textContent = detail;
    $('overlay-reconnect').hidden = !canReconnect;
    $('btn-reconnect').hidden = !canReconnect;
}

/** Shows or clears the "connection unstable" notice. */
export function showUnstable(unstable) {
    $('unstable').hidden = !unstable;
}

/** Shows a short notice (e.g. a transfer error) that fades after a while. */
let noticeTimer = null;
export function showNotice(text, ms = 6000) {
    const el = $('notice');
    el.textContent = text;
    el.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { el.hidden = true; }, ms);
}

/**
 * Toggles a side panel; only one is open at a time.
 * @param {string} id element id of the panel
 * @param {boolean} [open] force open/closed
 * @returns {boolean} whether the panel is now open
 */
export function togglePanel(id, open) {
    const panel = $(id);
    const show = open ?? panel.hidden;
    for (const other of document.querySelectorAll('.panel'))
        other.hidden = true;
    panel.hidden = !show;
    for (const button of document.querySelectorAll('[data-panel]'))
        button.classList.toggle('active', button.dataset.panel === id && show);
    return show;
}

/**
 * True when keystrokes belong to the page itself: focus is in a text field, or on a control
 * inside an open panel (so Enter/Space work in the file browser).
 */
export function isLocalInputFocused() {
    const el = document.activeElement;
    if (!el || el === document.body)
        return false;
    return el.matches('input, textarea, select') || el.isContentEditable || !!el.closest('.panel');
}

/** Moves focus back to the page body so keystrokes go to the remote session. */
export function releaseFocus() {
    const el = document.activeElement;
    if (el && el !== document.body && typeof el.blur === 'function')
        el.blur();
}
