// Builds the WebSocket tunnel URL and the connect data, exactly as the stock Guacamole web app does.

/** Path of the WebSocket tunnel, relative to the page (/guacamole/ → /guacamole/websocket-tunnel). */
export const TUNNEL_PATH = 'websocket-tunnel';

/**
 * Returns the absolute ws:// or wss:// URL of the tunnel for a page URL. The fragment and query
 * of the page are dropped; the tunnel sits next to index.html, so a reverse proxy that keeps
 * the /guacamole/ prefix keeps working.
 * @param {string} pageUrl e.g. location.href or document.baseURI
 * @returns {string}
 */
export function tunnelUrlFor(pageUrl) {
    const url = new URL(TUNNEL_PATH, pageUrl);
    url.hash = '';
    url.search = '';
    return url.href.replace(/^http(s?):/, 'ws$1:');
}

/**
 * Builds the tunnel connect data, field for field like the stock app's
 * ManagedClient.getConnectString (read back by TunnelRequest.java):
 * token, GUAC_DATA_SOURCE, GUAC_ID, GUAC_TYPE, GUAC_WIDTH, GUAC_HEIGHT, GUAC_DPI, GUAC_TIMEZONE,
 * then one GUAC_AUDIO / GUAC_VIDEO / GUAC_IMAGE entry per supported mimetype.
 *
 * @param {object} p
 * @param {string} p.token
 * @param {{ name: string, type: string, dataSource: string }} p.identifier
 * @param {number} p.width  in device pixels
 * @param {number} p.height in device pixels
 * @param {number} p.dpi
 * @param {string} [p.timezone] IANA name, e.g. "Europe/Berlin"
 * @param {string[]} [p.audio]
 * @param {string[]} [p.video]
 * @param {string[]} [p.image]
 * @returns {string}
 */
export function buildConnectString({ token, identifier, width, height, dpi, timezone = '', audio = [], video = [], image = [] }) {
    const e = encodeURIComponent;
    let data = 'token=' + e(token)
        + '&GUAC_DATA_SOURCE=' + e(identifier.dataSource)
        + '&GUAC_ID=' + e(identifier.name)
        + '&GUAC_TYPE=' + e(identifier.type)
        + '&GUAC_WIDTH=' + Math.floor(width)
        + '&GUAC_HEIGHT=' + Math.floor(height)
        + '&GUAC_DPI=' + Math.floor(dpi)
        + '&GUAC_TIMEZONE=' + e(timezone || '');
    for (const mimetype of audio)
        data += '&GUAC_AUDIO=' + e(mimetype);
    for (const mimetype of video)
        data += '&GUAC_VIDEO=' + e(mimetype);
    for (const mimetype of image)
        data += '&GUAC_IMAGE=' + e(mimetype);
    return data;
}

/**
 * Optimal remote display size for a viewport, the way the stock app computes it: CSS pixels
 * times devicePixelRatio, and 96 DPI scaled by the same ratio.
 * @param {number} cssWidth
 * @param {number} cssHeight
 * @param {number} [pixelRatio]
 * @returns {{ width: number, height: number, dpi: number }}
 */
export function optimalSize(cssWidth, cssHeight, pixelRatio = 1) {
    const ratio = pixelRatio > 0 ? pixelRatio : 1;
    return {
        width: Math.max(1, Math.floor(cssWidth * ratio)),
        height: Math.max(1, Math.floor(cssHeight * ratio)),
        dpi: Math.floor(96 * ratio),
    };
}

/** Shown once per page when the remote screen does not follow the window (guacd 1.3.0's VNC). */
export const FIXED_SIZE_MESSAGE = 'This desktop keeps its own screen size (the Guacamole server cannot resize it); the page scales it to fit the window.';

/**
 * Whether the remote display kept its size after the page asked for another one: guacd whose
 * VNC plugin cannot resize the remote screen (guacd 1.3.0) leaves it as it was. 1 px of slack
 * for rounding.
 * @param {{ width: number, height: number }} requested
 * @param {{ width: number, height: number }} actual
 */
export function keptItsSize(requested, actual) {
    if (!actual.width || !actual.height)
        return false;
    return Math.abs(requested.width - actual.width) > 1 || Math.abs(requested.height - actual.height) > 1;
}

/** Opcode of the web side's own instruction to this page (what a session can do); a stock
 * guacamole-common-js client ignores it. */
export const NOTICE_OPCODE = 'exoagent';

/**
 * Reads the web side's instruction: `display,resizes|fixed` (whether the remote screen follows
 * the window, from guacd's `args`), `files,unavailable,<status>,<message>` (guacd could not
 * open SFTP beside the desktop; the web side reopened the session without it), or
 * `download,<index>,failed,<reason>` (the web side cut the HTTP body of download stream
 * `<index>`; sent just before guacd's `end` of it, which alone looks like success).
 * @param {string[]} args
 * @returns {{ kind: 'display', resizes: boolean } | { kind: 'files-streams' } | { kind: 'files-unavailable', status: number | null, message: string } | { kind: 'download-failed', index: number, reason: string } | null}
 */
export function parseNotice(args) {
    if (args[0] === 'display' && (args[1] === 'resizes' || args[1] === 'fixed'))
        return { kind: 'display', resizes: args[1] === 'resizes' };
    if (args[0] === 'files' && args[1] === 'streams')
        return { kind: 'files-streams' };
    if (args[0] === 'files' && args[1] === 'unavailable') {
        const status = /^\d+$/.test(args[2] || '') ? Number(args[2]) : null;
        return { kind: 'files-unavailable', status, message: args[3] || '' };
    }
    if (args[0] === 'download' && /^\d{1,9}$/.test(args[1] || '') && args[2] === 'failed')
        return { kind: 'download-failed', index: Number(args[1]), reason: args[3] || 'the download failed' };
    return null;
}

/**
 * The HTTP URL of one file stream of a tunnel, as Apache's web app builds it
 * (tunnelService.js): `api/session/tunnels/<tunnel>/streams/<index>/<filename>?token=`.
 * @param {string} pageUrl the page's base URL (document.baseURI)
 * @param {string} tunnel the tunnel's UUID
 * @param {number} index the stream's index
 * @param {string} filename shown in the browser's save dialog only
 * @param {string} token
 */
export function streamUrl(pageUrl, tunnel, index, filename, token) {
    const url = new URL(`api/session/tunnels/${encodeURIComponent(tunnel)}/streams/${encodeURIComponent(String(index))}/${encodeURIComponent(filename)}`, pageUrl);
    url.search = `?token=${encodeURIComponent(token)}`;
    url.hash = '';
    return url.href;
}

/**
 * What the page says when file transfer is off for the session.
 * @param {number | null} status guacd's status code
 * @param {string} message guacd's message
 */
export function filesUnavailableMessage(status, message) {
    const why = [status !== null ? `status ${status}` : '', message].filter(Boolean).join(': ');
    return `File transfer is off for this session: the Guacamole server could not open SFTP to this machine's SSH server${why ? ` (${why})` : ''}. The desktop works without it.`;
}
