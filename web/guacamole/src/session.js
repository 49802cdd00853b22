// Owns the tunnel/client lifecycle: connecting, classifying closes, status updates and reconnects.
import Guacamole from 'guacamole-common-js';
import { buildConnectString, filesUnavailableMessage, NOTICE_OPCODE, parseNotice } from './connect.js';
import { supportedAudioTypes, supportedImageTypes, supportedVideoTypes } from './media.js';
import { createReconnectPolicy } from './reconnect-policy.js';
import { describeStatus, SESSION_ENDED_MESSAGE } from './status.js';
import { exo, setLastError, setState } from './state.js';
import { showNotice, showStatus, showUnstable } from './ui.js';

const AUTO_RECONNECT_DELAY_MS = 1000;

/**
 * @param {object} p
 * @param {string} p.token
 * @param {{ name: string, type: string, dataSource: string }} p.identifier
 * @param {string} p.tunnelUrl absolute ws(s):// URL
 * @param {() => { width: number, height: number, dpi: number }} p.getSize
 * @param {(client: Guacamole.Client) => void} p.onClient wire a new client (display, clipboard, files)
 * @param {(client: Guacamole.Client) => void} p.onConnected a client reached "connected"
 */
export function createSession({ token, identifier, tunnelUrl, getSize, onClient, onConnected, onDownloadFailed }) {
    const policy = createReconnectPolicy();
    let current = null;
    let reconnectTimer = null;
    let attempts = 0;

    function status(state, info = {}) {
        setState(state);
        showStatus(state, info);
    }

    /** Classifies the end of a session, once, and decides what happens next. */
    function finish(s) {
        if (s.finished)
            return;
        s.finished = true;
        if (s.client)
            s.client.disconnect(); // stops keep-alives; a no-op once disconnected
        if (s !== current || s.abandoned)
            return;
        showUnstable(false);
        exo.unstable = false;

        if (!s.error) {
            policy.closed(null);
            status('disconnected', { message: SESSION_ENDED_MESSAGE, canReconnect: true });
            return;
        }

        const { status: st, source } = s.error;
        const info = describeStatus(st.code, source);
        const detail = st.message && st.message !== String(st.code) ? st.message : '';
        setLastError({ code: info.code, message: info.message, source, detail });

        if (policy.closed(info)) {
            status('reconnecting', { message: `${info.message} Reconnecting…`, detail: `Guacamole status ${info.code}` });
            reconnectTimer = setTimeout(() => connect(), AUTO_RECONNECT_DELAY_MS);
            return;
        }
        status('error', {
            message: info.message,
            detail: `Guacamole status ${info.code}${detail ? ` — ${detail}` : ''}`,
            canReconnect: info.canReconnect,
        });
    }

    /**
     * Opens a new tunnel and client (dropping any previous one).
     * @param {{ manual?: boolean }} [options]
     */
    function connect(options) {
        return open(options).catch((err) => {
            const message = `The page failed to start the connection: ${err && err.message ? err.message : err}`;
            setLastError({ code: null, message, source: 'page' });
            status('error', { message, canReconnect: true });
        });
    }

    async function open({ manual = false } = {}) {
        clearTimeout(reconnectTimer);
        if (manual)
            policy.manual();
        if (current && !current.finished) {
            current.abandoned = true;
            finish(current);
        }
        if (attempts++ > 0)
            exo.reconnects++;

        const s = { client: null, tunnel: null, error: null, finished: false, abandoned: false };
        current = s;
        status('connecting', { message: `Connecting to ${identifier.name}…` });

        const image = await supportedImageTypes();
        if (s !== current)
            return;

        const { width, height, dpi } = getSize();
        const data = buildConnectString({
            token,
            identifier,
            width,
            height,
            dpi,
            timezone: Intl.DateTimeFormat().resolvedOptions().timeZone || '',
            audio: supportedAudioTypes(),
            video: supportedVideoTypes(),
            image,
        });

        const tunnel = new Guacamole.WebSocketTunnel(tunnelUrl);
        const client = new Guacamole.Client(tunnel);
        s.tunnel = tunnel;
        s.client = client;
        exo.client = client;
        exo.displayResizes = null;
        exo.filesUnavailable = null;
        exo.httpStreams = false;

        // The web side's own instruction: read here, then handed on like every other (the
        // client ignores its opcode but counts the traffic for its keep-alive).
        const handleInstruction = tunnel.oninstruction;
        tunnel.oninstruction = (opcode, parameters) => {
            if (opcode === NOTICE_OPCODE && s === current)
                notice(parseNotice(parameters));
            handleInstruction(opcode, parameters);
        };

        tunnel.onuuid = (uuid) => { exo.tunnelUuid = uuid; };
        tunnel.onerror = (st) => { s.error = s.error || { status: st, source: 'tunnel' }; };
        tunnel.onstatechange = (state) => {
            if (state === Guacamole.Tunnel.State.CLOSED) {
                finish(s);
            } else if (s === current && !s.finished) {
                exo.unstable = state === Guacamole.Tunnel.State.UNSTABLE;
                showUnstable(exo.unstable);
            }
        };
        client.onerror = (st) => { s.error = s.error || { status: st, source: 'remote' }; };
        client.onstatechange = (state) => {
            if (state === Guacamole.Client.State.CONNECTED && s === current && !s.finished) {
                policy.connected();
                status('connected', { message: `Connected to ${identifier.name}` });
                onConnected(client);
            } else if (state === Guacamole.Client.State.DISCONNECTED) {
                finish(s);
            }
        };
        client.onname = (name) => { document.title = `${name} – Guacamole`; };
        client.onrequired = (parameters) => {
            showNotice(`The remote side asked for ${parameters.join(', ')}, which this page cannot supply.`, 15000);
        };

        onClient(client);

        try {
            client.connect(data);
        } catch (err) {
            s.error = {
                status: err instanceof Guacamole.Status ? err : new Guacamole.Status(Guacamole.Status.Code.SERVER_ERROR, String(err)),
                source: 'tunnel',
            };
            finish(s);
        }
    }

    /** What the web side said about the current session. */
    function notice(n) {
        if (!n)
            return;
        if (n.kind === 'display') {
            exo.displayResizes = n.resizes;
        } else if (n.kind === 'files-streams') {
            exo.httpStreams = true;
        } else if (n.kind === 'download-failed') {
            if (onDownloadFailed)
                onDownloadFailed(n.index, n.reason);
        } else if (n.kind === 'files-unavailable') {
            exo.filesUnavailable = { status: n.status, message: n.message };
            showNotice(filesUnavailableMessage(n.status, n.message), 15000);
        }
    }

    /** Closes the session without reporting an error (page unload). */
    function close() {
        clearTimeout(reconnectTimer);
        if (current && !current.finished) {
            current.abandoned = true;
            finish(current);
        }
    }

    return {
        connect,
        close,
        getClient: () => (current && current.client) || null,
    };
}
