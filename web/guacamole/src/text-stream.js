// Reads and writes text over Guacamole streams as real UTF-8.
//
// guacamole-common-js 1.5's StringReader/JSONReader build a 4-byte UTF-8 sequence with
// String.fromCharCode, which keeps only 16 bits (U+1F600 becomes U+F600), and its StringWriter
// encodes each UTF-16 unit on its own, so a character outside the Basic Multilingual Plane
// leaves as two encoded surrogates (invalid UTF-8). guacd sends raw UTF-8 and may cut a
// character between two blobs (its clipboard goes out in 4096-byte blocks), so decoding must
// carry partial sequences from one blob to the next: TextDecoder with {stream: true} does.
// Nothing here imports guacamole-common-js: a stream is anything with onblob/onend (input) or
// sendBlob/sendEnd (output), which keeps the module testable under node.

/** Bytes per blob when writing: guacamole-common-js's ArrayBufferWriter default (6048). */
export const BLOB_BYTES = 6048;

/** Decodes base64 (a blob's payload) into bytes. */
export function base64ToBytes(data) {
    const binary = atob(data);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++)
        bytes[i] = binary.charCodeAt(i);
    return bytes;
}

/** Encodes bytes as base64 (a blob's payload). */
export function bytesToBase64(bytes) {
    let binary = '';
    for (let i = 0; i < bytes.length; i += 0x8000)
        binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return btoa(binary);
}

/**
 * A streaming UTF-8 decoder over base64 blobs: push() each blob, finish() at the end.
 * Invalid sequences become U+FFFD, never an exception.
 */
export function createUtf8BlobDecoder() {
    const decoder = new TextDecoder('utf-8', { fatal: false, ignoreBOM: true });
    let text = '';
    return {
        /** Adds one blob (base64) and returns the text it completed. */
        push(base64) {
            const chunk = decoder.decode(base64ToBytes(base64), { stream: true });
            text += chunk;
            return chunk;
        },
        /** Flushes a trailing partial sequence (as U+FFFD) and returns the whole text. */
        finish() {
            text += decoder.decode();
            return text;
        },
    };
}

/**
 * Reads a whole text stream.
 * @param {{onblob: Function|null, onend: Function|null}} stream an input stream
 * @param {object} handlers
 * @param {(text: string) => void} handlers.onend the whole text, once the stream ends
 * @param {() => void} [handlers.onprogress] after each blob (e.g. to acknowledge it)
 */
export function readText(stream, { onend, onprogress }) {
    const decoder = createUtf8BlobDecoder();
    stream.onblob = (data) => {
        decoder.push(data);
        if (onprogress)
            onprogress();
    };
    stream.onend = () => onend(decoder.finish());
}

/**
 * Reads a whole JSON stream (e.g. a directory listing).
 * @param {{onblob: Function|null, onend: Function|null}} stream
 * @param {object} handlers
 * @param {(value: unknown) => void} handlers.onend the parsed value
 * @param {(error: Error) => void} handlers.onerror the text was not JSON
 * @param {() => void} [handlers.onprogress]
 */
export function readJson(stream, { onend, onerror, onprogress }) {
    readText(stream, {
        onprogress,
        onend(text) {
            let value;
            try {
                value = JSON.parse(text);
            } catch (error) {
                onerror(error);
                return;
            }
            onend(value);
        },
    });
}

/** Splits text into the base64 blobs of its UTF-8 bytes, at most BLOB_BYTES bytes each. */
export function utf8Blobs(text, blobBytes = BLOB_BYTES) {
    const bytes = new TextEncoder().encode(text);
    const blobs = [];
    for (let offset = 0; offset < bytes.length; offset += blobBytes)
        blobs.push(bytesToBase64(bytes.subarray(offset, offset + blobBytes)));
    return blobs;
}

/**
 * Writes text as UTF-8 and ends the stream.
 * @param {{sendBlob: (data: string) => void, sendEnd: () => void}} stream an output stream
 */
export function writeText(stream, text) {
    for (const blob of utf8Blobs(text))
        stream.sendBlob(blob);
    stream.sendEnd();
}
