// Owns file uploads (file streams) and downloads (file/body streams → browser download), with progress.
import Guacamole from 'guacamole-common-js';
import { streamUrl } from './connect.js';
import { exo } from './state.js';
import { describeTransferStatus } from './status.js';
import { showNotice } from './ui.js';

let nextId = 1;

/** What an upload over HTTP is named while it runs; the web side renames it when complete
 * (docs/guacamole.md, "Cancel and partial files"). */
export const INCOMPLETE_SUFFIX = '.incomplete-upload';

/**
 * @param {object} p
 * @param {HTMLElement} p.list element that lists transfers
 * @param {() => (Guacamole.Client | null)} p.getClient
 * @param {string} p.token the session token (the HTTP stream endpoints check it)
 */
export function setupTransfers({ list, getClient, token }) {
    /** @type {Map<number, HTMLElement>} */
    const rows = new Map();
    /** Downloads the browser fetches over HTTP, by stream index, until guacd's `end`. */
    const httpDownloads = new Map();

    function render(t) {
        let row = rows.get(t.id);
        if (!row) {
            row = document.createElement('li');
            row.innerHTML = '<span class="arrow"></span><span class="name"></span><span class="progress"></span><a class="save" hidden>Save</a><button class="cancel" title="Cancel" hidden>Cancel</button><button class="dismiss" title="Dismiss">×</button>';
            row.querySelector('.dismiss').addEventListener('click', () => remove(t));
            row.querySelector('.cancel').addEventListener('click', () => {
                if (t.cancel)
                    t.cancel();
            });
            rows.set(t.id, row);
            list.append(row);
        }
        row.dataset.state = t.state;
        row.querySelector('.arrow').textContent = t.direction === 'upload' ? '↑' : '↓';
        row.querySelector('.name').textContent = t.name;
        let progress;
        if (t.state === 'error')
            progress = t.error;
        else if (t.state === 'cancelled')
            progress = t.leftover ? `cancelled; partial file left as ${t.leftover}` : 'cancelled';
        else if (t.state === 'done')
            progress = 'done';
        else if (t.size)
            progress = `${Math.floor((100 * t.bytes) / t.size)}%`;
        else
            progress = t.bytes ? formatBytes(t.bytes) : '…';
        row.querySelector('.progress').textContent = progress;
        row.querySelector('.cancel').hidden = !(t.cancel && (t.state === 'pending' || t.state === 'active'));
        list.hidden = rows.size === 0;
    }

    function remove(t) {
        const row = rows.get(t.id);
        if (row) {
            const link = row.querySelector('.save');
            if (link.href)
                URL.revokeObjectURL(link.href);
            row.remove();
        }
        rows.delete(t.id);
        exo.transfers = exo.transfers.filter((x) => x !== t);
        list.hidden = rows.size === 0;
    }

    function add(direction, name, size) {
        const t = { id: nextId++, direction, name, state: 'pending', bytes: 0, size, error: null, leftover: null, cancel: null };
        exo.transfers.push(t);
        render(t);
        return t;
    }

    function fail(t, message) {
        t.cancel = null;
        t.state = 'error';
        t.error = message;
        render(t);
        showNotice(`${t.direction === 'upload' ? 'Upload' : 'Download'} of ${t.name} failed: ${message}`);
    }

    /**
     * Uploads a file: to the connection's default upload folder (a "file" stream), or into a
     * folder of a filesystem object when `target` is given.
     * @param {File} file
     * @param {{ object: Guacamole.Object, path: string } | null} [target]
     */
    function upload(file, target = null) {
        const t = add('upload', file.name, file.size);
        const client = getClient();
        if (!client || exo.state !== 'connected') {
            fail(t, 'not connected');
            return;
        }
        const mimetype = file.type || 'application/octet-stream';
        // Over HTTP the file is written under a temporary name the web side renames once
        // guacd has it all: a cancelled or cut upload never looks complete.
        const http = Boolean(exo.httpStreams && exo.tunnelUuid);
        const streamName = http ? file.name + INCOMPLETE_SUFFIX : file.name;
        const stream = target
            ? target.object.createOutputStream(mimetype, joinPath(target.path, streamName))
            : client.createFileStream(mimetype, streamName);
        let cancelledEarly = false;
        t.cancel = () => {
            // Before guacd opened the file: end the stream when it answers.
            cancelledEarly = true;
            cancelled(t, null);
        };
        render(t);
        // The first ack answers the "file"/"put" instruction. Then the bytes go over HTTP
        // when the web side serves the stream endpoints, else as blobs over the WebSocket
        // (each later ack answers one blob).
        stream.onack = (status) => {
            stream.onack = null;
            if (cancelledEarly) {
                if (!status.isError()) {
                    stream.sendEnd();
                    t.leftover = streamName;
                    render(t);
                }
                return;
            }
            if (status.isError()) {
                fail(t, describeTransferStatus(status.code, status.message));
                return;
            }
            t.state = 'active';
            render(t);
            if (http)
                uploadOverHttp(t, file, stream, exo.tunnelUuid, streamName);
            else
                uploadAsBlobs(t, file, stream);
        };
    }

    /** Marks an upload cancelled; `leftover` names the partial file it left, if any. */
    function cancelled(t, leftover) {
        t.cancel = null;
        t.state = 'cancelled';
        t.leftover = leftover;
        render(t);
    }

    /**
     * POSTs the file to the stream's endpoint (Apache's contract; the URL names the final
     * name); the web side feeds guacd, ends the stream and renames `streamName` to it.
     */
    function uploadOverHttp(t, file, stream, tunnel, streamName) {
        const xhr = new XMLHttpRequest();
        xhr.open('POST', streamUrl(document.baseURI, tunnel, stream.index, file.name, token), true);
        t.cancel = () => {
            // The web side sees the body cut, ends guacd's stream and does not rename; the
            // page's own `end` is not passed on twice.
            xhr.abort();
        };
        xhr.onabort = () => {
            stream.sendEnd();
            cancelled(t, streamName);
        };
        xhr.upload.onprogress = (e) => {
            t.bytes = Math.min(e.loaded, file.size);
            render(t);
        };
        xhr.onload = () => {
            if (xhr.status >= 200 && xhr.status < 300) {
                exo.lastTransferPath = 'http';
                // The web side ended the stream (guacd closed the file) and renamed it; this
                // `end` only frees the stream here (the web side does not pass it on).
                stream.sendEnd();
                finishUpload(t, file);
                return;
            }
            let error = null;
            try {
                error = JSON.parse(xhr.responseText);
            } catch {
                // not JSON: described by the HTTP status below
            }
            stream.sendEnd();
            fail(t, error && error.message
                ? (error.statusCode ? describeTransferStatus(error.statusCode, error.message) : error.message)
                : `the server answered HTTP ${xhr.status}; a partial file may be left as ${streamName}`);
        };
        xhr.onerror = () => {
            stream.sendEnd();
            fail(t, `the upload was interrupted; a partial file may be left as ${streamName}`);
        };
        xhr.send(file);
    }

    function finishUpload(t, file) {
        t.cancel = null;
        t.bytes = file.size;
        t.state = 'done';
        render(t);
    }

    /** Sends the file as blobs over the WebSocket, one per ack (guacamole-common-js). */
    function uploadAsBlobs(t, file, stream) {
        const writer = new Guacamole.BlobWriter(stream);
        exo.lastTransferPath = 'blobs';
        writer.onprogress = (blob, offset) => {
            t.bytes = Math.min(offset, file.size);
            render(t);
        };
        writer.onack = (status) => {
            if (status.isError() && t.state !== 'error')
                fail(t, describeTransferStatus(status.code, status.message));
        };
        writer.oncomplete = () => {
            writer.sendEnd();
            finishUpload(t, file);
        };
        // Cancel: no further blob (not the one the writer may be reading now), then `end`, so
        // guacd closes the file. It keeps what arrived under the final name (guacd opens it
        // with O_TRUNC and the protocol has no rename).
        t.cancel = () => {
            stream.onack = null;
            stream.sendBlob = () => {};
            writer.sendEnd();
            cancelled(t, file.name);
        };
        render(t);
        writer.onerror = (blob, offset, error) => {
            writer.sendEnd();
            fail(t, `could not read the local file (${error && error.name ? error.name : 'error'})`);
        };
        writer.sendBlob(file);
    }

    /**
     * Receives a stream as a file and offers it as a browser download.
     * @param {Guacamole.InputStream} stream
     * @param {string} mimetype
     * @param {string} filename
     * @param {object} [existing] transfer record created when the download was requested
     */
    function download(stream, mimetype, filename, existing = null) {
        const t = existing || add('download', filename, null);
        t.name = filename;
        t.state = 'active';
        render(t);
        const tunnel = exo.tunnelUuid;
        if (exo.httpStreams && tunnel) {
            // The browser's own download manager fetches it from the stream's endpoint (no
            // copy in page memory); the web side acks guacd. guacd's `end` still reaches
            // the stream here; when the web side cut the body (guacd ended short of the
            // file's size) it says so just before (`downloadFailed`), and the download stays
            // failed.
            exo.lastTransferPath = 'http';
            httpDownloads.set(stream.index, t);
            stream.onend = () => {
                if (httpDownloads.get(stream.index) === t)
                    httpDownloads.delete(stream.index);
                if (t.state === 'error')
                    return;
                t.state = 'done';
                render(t);
            };
            const link = document.createElement('a');
            link.href = streamUrl(document.baseURI, tunnel, stream.index, filename, token);
            link.download = filename;
            link.hidden = true;
            document.body.append(link);
            link.click();
            link.remove();
            return;
        }
        exo.lastTransferPath = 'blobs';
        const reader = new Guacamole.BlobReader(stream, mimetype);
        reader.onprogress = () => {
            t.bytes = reader.getLength();
            render(t);
        };
        reader.onend = () => {
            const blob = reader.getBlob();
            t.bytes = blob.size;
            t.size = blob.size;
            t.state = 'done';
            render(t);
            const row = rows.get(t.id);
            const link = row.querySelector('.save');
            link.href = URL.createObjectURL(blob);
            link.download = filename;
            link.hidden = false;
            link.click(); // start the browser download; the Save link stays for a second try
        };
        // The sender waits for this first ack before sending data (SFTP downloads do).
        stream.sendAck('Ready', Guacamole.Status.Code.SUCCESS);
    }

    /**
     * Requests a file from a filesystem object and downloads it.
     * @param {Guacamole.Object} object
     * @param {string} path
     */
    function requestDownload(object, path) {
        const name = path.substring(path.lastIndexOf('/') + 1) || 'download';
        const t = add('download', name, null);
        const timer = setTimeout(() => {
            if (t.state === 'pending')
                fail(t, 'no response from the server');
        }, 30_000);
        object.requestInputStream(path, (stream, mimetype) => {
            clearTimeout(timer);
            if (t.state === 'error') {
                stream.sendAck('Cancelled', Guacamole.Status.Code.CLIENT_TIMEOUT);
                return;
            }
            download(stream, mimetype, name, t);
        });
    }

    return {
        upload,
        requestDownload,
        /**
         * The web side cut the HTTP body of download stream `index` (its notice, just before
         * guacd's `end`): the browser's download failed; so does the transfer here.
         * @param {number} index
         * @param {string} reason
         */
        downloadFailed(index, reason) {
            const t = httpDownloads.get(index);
            if (!t)
                return;
            httpDownloads.delete(index);
            fail(t, reason);
        },
        /** Wires a new client: remote-initiated downloads (e.g. `guacctl -d` in SSH). */
        attach(client) {
            // A new session: none of the old one's streams exist any more.
            httpDownloads.clear();
            client.onfile = (stream, mimetype, filename) => download(stream, mimetype, filename);
        },
    };
}

/** Joins a directory path and a file name with exactly one slash. */
export function joinPath(dir, name) {
    return dir.endsWith('/') ? dir + name : `${dir}/${name}`;
}

function formatBytes(n) {
    if (n < 1024)
        return `${n} B`;
    if (n < 1024 * 1024)
        return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}
