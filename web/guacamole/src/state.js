// Owns window.exoGuac (the page state browser tests poll) and the <body data-state> attribute.
import Guacamole from 'guacamole-common-js';

/**
 * Live page state. The object is created once and mutated in place, so `window.exoGuac.state`
 * always reads the current value.
 *
 * state: "loading" | "no-token" | "bad-link" | "connecting" | "connected" | "reconnecting"
 *        | "disconnected" | "error"
 */
export const exo = {
    state: 'loading',
    /** @type {Guacamole.Client | null} the current (or last) client */
    client: null,
    /** @type {{ code: number | null, message: string, source: string, detail?: string } | null} */
    lastError: null,
    /** @type {string | null} latest clipboard text received from the remote side */
    clipboard: null,
    /** @type {string | null} connection name from the link ("shell", "desktop") */
    connection: null,
    /** @type {string | null} WebSocket URL the tunnel connects to */
    tunnelUrl: null,
    /** @type {string | null} tunnel UUID sent by the server as the first instruction */
    tunnelUuid: null,
    /** number of reconnects (automatic and manual) since the page loaded */
    reconnects: 0,
    /** true while the tunnel reports the connection as unstable */
    unstable: false,
    /** @type {string[]} names of the filesystems (SFTP) the remote side offered */
    filesystems: [],
    /** @type {Array<{ id: number, direction: 'upload' | 'download', name: string, state: 'pending' | 'active' | 'done' | 'error', bytes: number, size: number | null, error: string | null }>} */
    transfers: [],
    /** true once the page said the remote screen keeps its size (it does not follow the window) */
    fixedSize: false,
    /** true when the web side serves this tunnel's file streams over HTTP (`exoagent,files,streams`) */
    httpStreams: false,
    /** @type {'http' | 'blobs' | null} how the last transfer moved its bytes (for tests) */
    lastTransferPath: null,
    /** @type {boolean | null} whether the remote screen follows the window, as the web side
     * read it from guacd's `args` for the current session (null: not told) */
    displayResizes: null,
    /** @type {{ status: number | null, message: string } | null} set when guacd could not open
     * SFTP beside the desktop and the session runs without file transfer */
    filesUnavailable: null,
    /** the guacamole-common-js namespace, for tests */
    Guacamole,
};

window.exoGuac = exo;

/** @param {string} state */
export function setState(state) {
    exo.state = state;
    document.body.dataset.state = state;
}

/** @param {{ code: number | null, message: string, source: string, detail?: string }} error */
export function setLastError(error) {
    exo.lastError = error;
}
