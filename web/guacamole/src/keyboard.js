// Owns keyboard input: forwards keys to the remote session and detects the Ctrl+Alt+Shift menu chord.
import Guacamole from 'guacamole-common-js';
import { exo } from './state.js';
import { isLocalInputFocused } from './ui.js';

const CTRL = [0xFFE3, 0xFFE4];
const ALT = [0xFFE9, 0xFFEA];
const SHIFT = [0xFFE1, 0xFFE2];
const MENU_KEYS = new Set([...CTRL, ...ALT, ...SHIFT]);

/**
 * @param {object} p
 * @param {() => (Guacamole.Client | null)} p.getClient
 * @param {() => void} p.onMenuChord called when Ctrl+Alt+Shift is pressed (and nothing else)
 */
export function setupKeyboard({ getClient, onMenuChord }) {
    const keyboard = new Guacamole.Keyboard(document);
    /** keys pressed locally (for the chord) */
    const held = new Set();
    /** keys whose press went to the remote side (so only those get a release) */
    const sent = new Set();

    keyboard.onkeydown = (keysym) => {
        held.add(keysym);
        const onlyMenuKeys = [...held].every((k) => MENU_KEYS.has(k));
        if (onlyMenuKeys && CTRL.some((k) => held.has(k)) && ALT.some((k) => held.has(k)) && SHIFT.some((k) => held.has(k))) {
            // Release the modifiers on the remote side, then toggle the menu.
            queueMicrotask(() => keyboard.reset());
            onMenuChord();
            return false;
        }

        // Typing while the menu is open or in the page's own fields stays local, and so does
        // everything while no session is up (e.g. Enter on the Reconnect button).
        if (isLocalInputFocused() || exo.state !== 'connected')
            return true;

        const client = getClient();
        if (client) {
            client.sendKeyEvent(1, keysym);
            sent.add(keysym);
        }
        return false;
    };

    keyboard.onkeyup = (keysym) => {
        held.delete(keysym);
        if (sent.delete(keysym)) {
            const client = getClient();
            if (client)
                client.sendKeyEvent(0, keysym);
        }
    };

    // Keys held while the window loses focus would otherwise stay pressed remotely.
    window.addEventListener('blur', () => keyboard.reset());

    return {
        /** Sends Ctrl+Alt+Del (press, then release in reverse order). */
        sendCtrlAltDel() {
            const client = getClient();
            if (!client || exo.state !== 'connected')
                return;
            const keys = [0xFFE3, 0xFFE9, 0xFFFF];
            for (const k of keys)
                client.sendKeyEvent(1, k);
            for (const k of keys.reverse())
                client.sendKeyEvent(0, k);
        },

        /** Releases every pressed key (e.g. before switching to a new client). */
        reset() {
            keyboard.reset();
            held.clear();
            sent.clear();
        },
    };
}
