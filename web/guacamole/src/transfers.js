// Owns file uploads (file streams) and downloads (file/body streams → browser download), with progress.
import Guacamole from 'guacamole-common-js';
import { exo } from './state.js';
import { describeTransferStatus } from './status.js';
import { showNotice } from './ui.js';

let nextId = 1;

/**
 * @param {object} p
 * @param {HTMLElement} p.list element that lists transfers
 * @param {() => (Guacamole.Client | null)} p.getClient
 */
export function setupTransfers({ list, getClient }) {
    /** @type {Map<number, HTMLElement>} */
    const rows = new Map();

    function render(t) {
        let row = rows.get(t.id);
        if (!row) {
            row = document.createElement('li');
            row.innerHTML = '<span class="arrow"></span><span class="name"></span><span class="progress"></span><a class="save" hidden>Save</a><button class="dismiss" title="Dismiss">×</button>';
            row.querySelector('.dismiss').addEventListener('click', () => remove(t));
            rows.set(t.id, row);
            list.append(row);
        }
        row.dataset.state = t.state;
        row.querySelector('.arrow').textContent = t.direction === 'upload' ? '↑' : '↓';
        row.querySelector('.name').textContent = t.name;
        let progress;
        if (t.state === 'error')
            progress = t.error;
        else if (t.state === 'done')
            progress = 'done';
        else if (t.size)
            progress = `${Math.floor((100 * t.bytes) / t.size)}%`;
        else
            progress = t.bytes ? formatBytes(t.bytes) : '…';
        row.querySelector('.progress').textContent = progress;
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
        const t = { id: nextId++, direction, name, state: 'pending', bytes: 0, size, error: null };
        exo.transfers.push(t);
        render(t);
        return t;
    }

    function fail(t, message) {
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
        const stream = target
            ? target.object.createOutputStream(mimetype, joinPath(target.path, file.name))
            : client.createFileStream(mimetype, file.name);
        const writer = new Guacamole.BlobWriter(stream);
        let started = false;

        // The first ack answers the "file"/"put" instruction; later acks answer each blob.
        writer.onack = (status) => {
            if (status.isError()) {
                if (t.state !== 'error')
                    fail(t, describeTransferStatus(status.code, status.message));
                return;
            }
            if (!started) {
                started = true;
                t.state = 'active';
                render(t);
                writer.sendBlob(file);
            }
        };
        writer.onprogress = (blob, offset) => {
            t.bytes = Math.min(offset, file.size);
            render(t);
        };
        writer.oncomplete = () => {
            writer.sendEnd();
            t.bytes = file.size;
            t.state = 'done';
            render(t);
        };
        writer.onerror = (blob, offset, error) => {
            writer.sendEnd();
            fail(t, `could not read the local file (${error && error.name ? error.name : 'error'})`);
        };
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
        /** Wires a new client: remote-initiated downloads (e.g. `guacctl -d` in SSH). */
        attach(client) {
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
