// Maps Guacamole status codes (WebSocket close reasons, error instructions, acks) to human messages.

/** Guacamole status codes (guacamole-common-js Status.js / libguac protocol-constants.h). */
export const Code = Object.freeze({
    SUCCESS: 0x0000,
    UNSUPPORTED: 0x0100,
    SERVER_ERROR: 0x0200,
    SERVER_BUSY: 0x0201,
    UPSTREAM_TIMEOUT: 0x0202,
    UPSTREAM_ERROR: 0x0203,
    RESOURCE_NOT_FOUND: 0x0204,
    RESOURCE_CONFLICT: 0x0205,
    RESOURCE_CLOSED: 0x0206,
    UPSTREAM_NOT_FOUND: 0x0207,
    UPSTREAM_UNAVAILABLE: 0x0208,
    SESSION_CONFLICT: 0x0209,
    SESSION_TIMEOUT: 0x020A,
    SESSION_CLOSED: 0x020B,
    CLIENT_BAD_REQUEST: 0x0300,
    CLIENT_UNAUTHORIZED: 0x0301,
    CLIENT_FORBIDDEN: 0x0303,
    CLIENT_TIMEOUT: 0x0308,
    CLIENT_OVERRUN: 0x030D,
    CLIENT_BAD_TYPE: 0x030F,
    CLIENT_TOO_MANY: 0x031D,
});

export const SESSION_EXPIRED_MESSAGE = 'This session has expired. Reopen the connection from Exosphere.';
export const NO_TOKEN_MESSAGE = 'This link has no access token. Open the connection from Exosphere (Terminal or Graphical Desktop).';
export const BAD_LINK_MESSAGE = 'This link does not name a valid connection. Open the connection from Exosphere (Terminal or Graphical Desktop).';
export const SESSION_ENDED_MESSAGE = 'The session has ended.';

/** Messages for codes the server (exoagent) uses as WebSocket close reasons. */
const TUNNEL_MESSAGES = {
    [Code.CLIENT_UNAUTHORIZED]: SESSION_EXPIRED_MESSAGE,
    [Code.CLIENT_FORBIDDEN]: 'You are not allowed to use this connection. Reopen it from Exosphere.',
    [Code.CLIENT_BAD_REQUEST]: 'The server rejected the connection request as invalid.',
    [Code.CLIENT_TOO_MANY]: 'Too many sessions are open for this connection. Close another Guacamole tab and try again.',
    [Code.CLIENT_TIMEOUT]: 'The session was closed because this browser stopped responding.',
    [Code.CLIENT_OVERRUN]: 'The session was closed because this browser sent too much data.',
    [Code.CLIENT_BAD_TYPE]: 'The server does not accept the kind of data this browser sent.',
    [Code.UPSTREAM_NOT_FOUND]: 'The remote session could not be reached. The instance may still be starting; try again in a minute.',
    [Code.UPSTREAM_UNAVAILABLE]: 'The remote session is unavailable right now. Try again in a minute.',
    [Code.UPSTREAM_TIMEOUT]: 'The remote session did not respond in time.',
    [Code.UPSTREAM_ERROR]: 'The remote session reported an error and closed the connection.',
    [Code.SERVER_ERROR]: 'The server hit an internal error.',
    [Code.SERVER_BUSY]: 'The server is busy. Try again in a moment.',
    [Code.RESOURCE_NOT_FOUND]: 'This connection does not exist on the server.',
    [Code.RESOURCE_CONFLICT]: 'This connection conflicts with another active session.',
    [Code.RESOURCE_CLOSED]: 'The connection was closed by the server.',
    [Code.SESSION_CONFLICT]: 'The session was closed because it conflicts with another session.',
    [Code.SESSION_TIMEOUT]: 'The session was closed after a period of inactivity.',
    [Code.SESSION_CLOSED]: 'The session was closed by the server.',
    [Code.UNSUPPORTED]: 'The server does not support this operation.',
};

/**
 * Messages that differ when the code arrives in an `error` instruction from guacd (the remote
 * side of the session) rather than as the tunnel's close reason: there, 769/771 mean the remote
 * system (SSH/VNC) refused the login, not that the Guacamole token expired.
 */
const REMOTE_MESSAGES = {
    [Code.CLIENT_UNAUTHORIZED]: 'The remote system rejected the login (authentication failed).',
    [Code.CLIENT_FORBIDDEN]: 'The remote system denied access.',
    [Code.UPSTREAM_NOT_FOUND]: 'The remote system could not be reached.',
    [Code.UPSTREAM_UNAVAILABLE]: 'The remote system is unavailable right now. Try again in a minute.',
};

/** Codes after which an automatic reconnect can help (the server or network hiccupped). */
const TRANSIENT = new Set([
    Code.SERVER_ERROR,
    Code.SERVER_BUSY,
    Code.UPSTREAM_TIMEOUT,
    Code.UPSTREAM_ERROR,
    Code.UPSTREAM_NOT_FOUND,
    Code.UPSTREAM_UNAVAILABLE,
]);

/**
 * Describes a status code for the user.
 *
 * @param {number} code Guacamole status code
 * @param {'tunnel' | 'remote'} [source] "tunnel": the WebSocket close reason set by the server
 *     (or derived by the library from the close code); "remote": an `error` instruction.
 * @returns {{ code: number, message: string, canReconnect: boolean, transient: boolean }}
 */
export function describeStatus(code, source = 'tunnel') {
    const n = Number.isFinite(code) ? code : Code.SERVER_ERROR;
    const message = (source === 'remote' && REMOTE_MESSAGES[n])
        || TUNNEL_MESSAGES[n]
        || (n === Code.SUCCESS ? SESSION_ENDED_MESSAGE : `The connection closed unexpectedly (Guacamole status ${n}).`);
    const expired = source === 'tunnel' && n === Code.CLIENT_UNAUTHORIZED;
    return {
        code: n,
        message,
        canReconnect: !expired,
        transient: TRANSIENT.has(n),
    };
}

/**
 * Message for a failed upload/download acknowledgement.
 * @param {number} code
 * @param {string} [serverText] the text the server put in the ack
 * @returns {string}
 */
export function describeTransferStatus(code, serverText = '') {
    let text;
    switch (code) {
        case Code.UNSUPPORTED: text = 'file transfer is not available on this connection'; break;
        case Code.CLIENT_UNAUTHORIZED:
        case Code.CLIENT_FORBIDDEN: text = 'permission denied'; break;
        case Code.RESOURCE_NOT_FOUND: text = 'file or folder not found'; break;
        case Code.RESOURCE_CONFLICT: text = 'a file with that name is in the way'; break;
        case Code.SERVER_BUSY: text = 'the server is busy'; break;
        case Code.CLIENT_OVERRUN: text = 'the file is too large'; break;
        default: text = 'transfer failed';
    }
    const detail = serverText && serverText.toLowerCase() !== text ? ` (${serverText})` : '';
    return `${text}${detail} [status ${code}]`;
}
