// Owns the status overlay, the menu's status line and opening/closing the menu.

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
 * Shows the state in the menu and, unless connected, in the centred overlay.
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

/** Whether the menu is open. */
export function isMenuOpen() {
    return !$('menu').hidden;
}

/**
 * Opens or closes the menu (the one place for clipboard, files, zoom…); the handle shows
 * only while it is closed.
 * @param {boolean} [open] force open/closed; toggles when absent
 * @returns {boolean} whether the menu is now open
 */
export function toggleMenu(open) {
    const show = open ?? !isMenuOpen();
    $('menu').hidden = !show;
    $('menu-handle').hidden = show;
    $('menu-handle').setAttribute('aria-expanded', String(show));
    document.body.classList.toggle('menu-open', show);
    return show;
}

/**
 * True when keystrokes belong to the page itself: the menu is open (as in Guacamole's own
 * client, typing then goes to the menu, not the session), or focus is in a text field.
 */
export function isLocalInputFocused() {
    if (isMenuOpen())
        return true;
    const el = document.activeElement;
    if (!el || el === document.body)
        return false;
    return el.matches('input, textarea, select') || el.isContentEditable;
}

/** Moves focus back to the page body so keystrokes go to the remote session. */
export function releaseFocus() {
    const el = document.activeElement;
    if (el && el !== document.body && typeof el.blur === 'function')
        el.blur();
}
