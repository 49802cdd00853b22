// Owns the small SFTP file browser: lists folders of a filesystem object, downloads and uploads files.
import Guacamole from 'guacamole-common-js';
import { filesUnavailableMessage } from './connect.js';
import { exo } from './state.js';
import { readJson } from './text-stream.js';

/**
 * @param {object} p
 * @param {HTMLElement} p.panel the files section of the menu
 * @param {ReturnType<import('./transfers.js').setupTransfers>} p.transfers
 */
export function setupFiles({ panel, transfers }) {
    const select = panel.querySelector('.fs-select');
    const pathLabel = panel.querySelector('.fs-path');
    const listing = panel.querySelector('.fs-list');
    const upButton = panel.querySelector('.fs-up');
    const uploadInput = panel.querySelector('.fs-upload-input');

    /** @type {Array<{ object: Guacamole.Object, name: string }>} */
    let filesystems = [];
    let current = null;
    let path = '/';
    let request = 0;

    function publish() {
        exo.filesystems = filesystems.map((fs) => fs.name);
        panel.dataset.filesystems = String(filesystems.length);
        select.hidden = filesystems.length < 2;
        select.replaceChildren(...filesystems.map((fs, i) => new Option(fs.name, String(i), false, fs === current)));
    }

    /** Enables or disables every button of the panel (off while file transfer is). */
    function setButtons(enabled) {
        for (const button of panel.querySelectorAll('button'))
            button.disabled = !enabled;
    }

    function message(text) {
        const li = document.createElement('li');
        li.className = 'fs-message';
        li.textContent = text;
        listing.replaceChildren(li);
    }

    /** Lists a folder: the server sends a JSON object mapping each child path to its mimetype. */
    function list(dir) {
        if (!current)
            return;
        path = dir;
        pathLabel.textContent = dir;
        upButton.disabled = dir === '/';
        message('Loading…');
        const id = ++request;
        const fs = current;
        fs.object.requestInputStream(dir, (stream, mimetype) => {
            if (mimetype !== Guacamole.Object.STREAM_INDEX_MIMETYPE) {
                stream.sendAck('Not a folder', Guacamole.Status.Code.CLIENT_BAD_TYPE);
                if (id === request)
                    message('This is not a folder.');
                return;
            }
            // guacd sends the listing as raw UTF-8 JSON, one blob per acknowledgement.
            readJson(stream, {
                onprogress: () => stream.sendAck('Received', Guacamole.Status.Code.SUCCESS),
                onend: (value) => {
                    if (id !== request || fs !== current)
                        return;
                    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
                        message('The folder listing could not be read.');
                        return;
                    }
                    show(Object.entries(value));
                },
                onerror: () => {
                    if (id === request && fs === current)
                        message('The folder listing could not be read.');
                },
            });
            stream.sendAck('Ready', Guacamole.Status.Code.SUCCESS);
        });
    }

    function show(entries) {
        const items = entries.map(([childPath, mimetype]) => ({
            path: childPath,
            name: childPath.substring(childPath.lastIndexOf('/') + 1),
            folder: mimetype === Guacamole.Object.STREAM_INDEX_MIMETYPE,
        }));
        items.sort((a, b) => (b.folder - a.folder) || a.name.localeCompare(b.name));
        if (items.length === 0) {
            message('(empty folder)');
            return;
        }
        listing.replaceChildren(...items.map((item) => {
            const li = document.createElement('li');
            const link = document.createElement('button');
            link.type = 'button';
            link.className = item.folder ? 'fs-folder' : 'fs-file';
            link.textContent = item.folder ? `${item.name}/` : item.name;
            link.title = item.folder ? `Open ${item.path}` : `Download ${item.path}`;
            link.addEventListener('click', () => {
                if (item.folder)
                    list(item.path);
                else
                    transfers.requestDownload(current.object, item.path);
            });
            li.append(link);
            return li;
        }));
    }

    upButton.addEventListener('click', () => {
        const parent = path.replace(/\/[^/]*\/?$/, '') || '/';
        list(parent);
    });
    panel.querySelector('.fs-refresh').addEventListener('click', () => list(path));
    panel.querySelector('.fs-upload').addEventListener('click', () => uploadInput.click());
    uploadInput.addEventListener('change', () => {
        const target = current ? { object: current.object, path } : null;
        for (const file of uploadInput.files)
            transfers.upload(file, target);
        uploadInput.value = '';
        // Show the new files once the uploads had a moment to finish.
        setTimeout(() => list(path), 1500);
    });
    select.addEventListener('change', () => {
        current = filesystems[Number(select.value)] || null;
        list('/');
    });

    return {
        /** Wires a new client: each "filesystem" instruction offers one browsable filesystem. */
        attach(client) {
            filesystems = [];
            current = null;
            setButtons(true);
            publish();
            message('No filesystem offered yet.');
            client.onfilesystem = (object, name) => {
                const fs = { object, name };
                filesystems.push(fs);
                object.onundefine = () => {
                    filesystems = filesystems.filter((x) => x !== fs);
                    if (current === fs) {
                        current = filesystems[0] || null;
                        if (current) list('/'); else message('The filesystem went away.');
                    }
                    publish();
                };
                if (!current) {
                    current = fs;
                    path = '/';
                }
                publish();
            };
        },

        /** Called when the menu opens: (re)load the current folder. */
        opened() {
            if (current)
                list(path);
            else if (exo.filesUnavailable) {
                // Nothing to browse or upload into for this session: say why, offer nothing.
                setButtons(false);
                message(filesUnavailableMessage(exo.filesUnavailable.status, exo.filesUnavailable.message));
            }
            else
                message('No filesystem is available on this connection.');
        },
    };
}
