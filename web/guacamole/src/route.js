// Parses the client link Exosphere opens (#/client/<id>?token=…) into a connection identifier and token.

/**
 * Decodes percent-escapes without throwing on malformed input.
 * @param {string} value
 * @returns {string}
 */
function safeDecodeURIComponent(value) {
    try {
        return decodeURIComponent(value);
    } catch {
        return value;
    }
}

/**
 * Decodes base64 in either encoding Guacamole uses for client ids: padded standard base64
 * (Exosphere, Guacamole <= 1.5) or unpadded base64url (current upstream Guacamole).
 * @param {string} encoded
 * @returns {string | null} the decoded text, or null when it is not base64
 */
export function decodeBase64Id(encoded) {
    let b64 = safeDecodeURIComponent(String(encoded)).trim()
        .replace(/-/g, '+')
        .replace(/_/g, '/')
        .replace(/=+$/, '');
    if (b64 === '' || !/^[A-Za-z0-9+/]+$/.test(b64) || b64.length % 4 === 1)
        return null;
    b64 += '='.repeat((4 - (b64.length % 4)) % 4);

    let binary;
    try {
        binary = atob(b64);
    } catch {
        return null;
    }
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    try {
        return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    } catch {
        return binary; // not UTF-8: treat as Latin-1, like btoa()/atob() in the stock app
    }
}

/**
 * Parses a Guacamole client identifier: base64 of "<name>\0<type>\0<dataSource>".
 * @param {string} encoded
 * @returns {{ name: string, type: string, dataSource: string } | null}
 */
export function parseClientIdentifier(encoded) {
    const text = decodeBase64Id(encoded);
    if (text === null)
        return null;
    const parts = text.split('\0');
    if (parts.length !== 3)
        return null;
    const [name, type, dataSource] = parts;
    if (!name || !type || !dataSource)
        return null;
    return { name, type, dataSource };
}

/**
 * Reads one parameter from a query string without turning "+" into a space
 * (tokens are opaque; the stock app's token may be any URL-safe text).
 * @param {string} query query text without the leading "?"
 * @param {string} key
 * @returns {string | null}
 */
export function getQueryParam(query, key) {
    for (const pair of query.split('&')) {
        const eq = pair.indexOf('=');
        const name = eq === -1 ? pair : pair.slice(0, eq);
        if (safeDecodeURIComponent(name) === key)
            return eq === -1 ? '' : safeDecodeURIComponent(pair.slice(eq + 1));
    }
    return null;
}

/**
 * Parses the page location.
 *
 * The token comes from the fragment query (`#/client/<id>?token=…`, what Exosphere sends);
 * a `?token=` in the real query string is accepted as a fallback.
 *
 * @param {{ hash?: string, search?: string }} location
 * @returns {{ id: string | null, identifier: { name: string, type: string, dataSource: string } | null, token: string | null }}
 */
export function parseClientLocation({ hash = '', search = '' } = {}) {
    const fragment = hash.replace(/^#/, '');
    const q = fragment.indexOf('?');
    const path = q === -1 ? fragment : fragment.slice(0, q);
    const fragmentQuery = q === -1 ? '' : fragment.slice(q + 1);

    let token = getQueryParam(fragmentQuery, 'token');
    if (!token)
        token = getQueryParam(search.replace(/^\?/, ''), 'token');
    if (!token)
        token = null;

    const match = /^\/?client\/([^/]+)\/?$/.exec(path);
    const id = match ? match[1] : null;
    const identifier = id === null ? null : parseClientIdentifier(id);

    return { id, identifier, token };
}
