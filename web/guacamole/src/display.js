// Owns the remote display: mounting it, fitting it to the window, sending resizes, mouse and touch input.
import Guacamole from 'guacamole-common-js';
import { FIXED_SIZE_MESSAGE, keptItsSize, optimalSize } from './connect.js';
import { exo } from './state.js';
import { releaseFocus, showNotice } from './ui.js';

const RESIZE_DEBOUNCE_MS = 250;
/** How long the remote side gets to follow a resize before the page says it did not. */
const RESIZE_FOLLOW_MS = 2500;

/**
 * @param {object} p
 * @param {HTMLElement} p.viewport full-window area the display is fitted into
 * @param {HTMLElement} p.container element wrapping the display element (receives input)
 * @param {() => (Guacamole.Client | null)} p.getClient
 */
export function setupDisplay({ viewport, container, getClient }) {
    /** @type {Guacamole.Display | null} */
    let display = null;
    let localCursor = false;
    /** null: fit the window; a number: that scale (the viewport then scrolls) */
    let zoom = null;

    /** Scales the display so the whole remote screen fits the window, or to the chosen zoom. */
    function fit() {
        if (!display)
            return;
        viewport.classList.toggle('zoomed', zoom !== null);
        if (zoom !== null) {
            display.scale(zoom);
            return;
        }
        const width = display.getWidth();
        const height = display.getHeight();
        if (!width || !height)
            return;
        const scale = Math.min(viewport.clientWidth / width, viewport.clientHeight / height);
        if (scale > 0 && Number.isFinite(scale))
            display.scale(scale);
    }

    /** The remote screen size that matches the window (device pixels, like the stock app). */
    function currentSize() {
        return optimalSize(viewport.clientWidth, viewport.clientHeight, window.devicePixelRatio || 1);
    }

    // Mouse: positions are relative to the container, in CSS pixels; sendMouseState(…, true)
    // divides by the display scale, which maps them to remote pixels.
    const mouse = new Guacamole.Mouse(container);
    mouse.onEach(['mousedown', 'mousemove', 'mouseup'], (event) => {
        const client = getClient();
        if (!client || !display)
            return;
        display.showCursor(!localCursor);
        client.sendMouseState(event.state, true);
    });
    mouse.on('mouseout', () => {
        if (display)
            display.showCursor(false);
    });

    // Touch: absolute emulation (tap = click, drag = drag), like the stock default.
    const touch = new Guacamole.Mouse.Touchscreen(container);
    touch.onEach(['mousedown', 'mousemove', 'mouseup'], (event) => {
        const client = getClient();
        if (!client || !display)
            return;
        display.showCursor(true);
        client.sendMouseState(event.state, true);
    });

    // Clicking the remote screen hands the keyboard back to it.
    container.addEventListener('mousedown', releaseFocus);
    container.addEventListener('touchstart', releaseFocus, { passive: true });

    let resizeTimer = null;
    let followTimer = null;
    window.addEventListener('resize', () => {
        fit();
        clearTimeout(resizeTimer);
        clearTimeout(followTimer);
        resizeTimer = setTimeout(() => {
            const client = getClient();
            if (client) {
                const requested = currentSize();
                client.sendSize(requested.width, requested.height);
                // The web side said this guacd cannot resize the remote screen: no need to wait.
                if (exo.displayResizes === false) {
                    if (!exo.fixedSize) {
                        exo.fixedSize = true;
                        showNotice(FIXED_SIZE_MESSAGE, 10000);
                    }
                    return;
                }
                // A remote screen that cannot follow (guacd 1.3.0's VNC plugin has no display
                // resize) stays as it is and is scaled to fit: say so, once per page.
                followTimer = setTimeout(() => {
                    if (exo.fixedSize || getClient() !== client || !display)
                        return;
                    if (keptItsSize(requested, { width: display.getWidth(), height: display.getHeight() })) {
                        exo.fixedSize = true;
                        showNotice(FIXED_SIZE_MESSAGE, 10000);
                    }
                }, RESIZE_FOLLOW_MS);
            }
        }, RESIZE_DEBOUNCE_MS);
    });

    return {
        currentSize,
        fit,

        /** Fits the window (null) or shows the remote screen at a fixed scale (1 = 100 %). */
        setZoom(scale) {
            zoom = scale;
            fit();
        },

        /** Shows the display of a (new) client in place of the previous one. */
        mount(client) {
            display = client.getDisplay();
            localCursor = false;
            display.onresize = fit;
            display.oncursor = (canvas, x, y) => {
                localCursor = mouse.setCursor(canvas, x, y);
            };
            display.showCursor(false);
            container.replaceChildren(display.getElement());
            fit();
        },
    };
}
