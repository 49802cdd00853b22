// Shows exoagent's idle warning on the page: while the instance waits to be shelved for
// idleness, a banner says when, so whoever opens the page can act (any activity cancels it).

/** How often the page asks (the agent samples idleness every minute by default). */
export const NOTICE_INTERVAL_MS = 30000;

/**
 * The warning for a notice from `api/exoagent/notice` (`{state, idle_since_ms, action_at_ms}`),
 * or null when there is nothing to warn about. Times are shown in the browser's own time zone.
 * @param {{state?: string, idle_since_ms?: number, action_at_ms?: number} | null} notice
 * @param {(ms: number) => string} [clock]
 * @returns {string | null}
 */
export function idleWarning(notice, clock = (ms) => new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })) {
    if (!notice || typeof notice.action_at_ms !== 'number')
        return null;
    if (notice.state === 'shelve-pending') {
        const since = typeof notice.idle_since_ms === 'number' ? ` since ${clock(notice.idle_since_ms)}` : '';
        return `This instance has been idle${since} and will be shelved at ${clock(notice.action_at_ms)} ` +
            'unless there is activity. Working in a session (or reconnecting) cancels it.';
    }
    if (notice.state === 'shelving')
        return 'This instance is being shelved for idleness. Unshelve it from Exosphere to use it again.';
    return null;
}

/**
 * Asks `url` for the notice every `interval` ms and shows the warning in `element` (hidden
 * when there is none). A failed request changes nothing shown.
 * @param {HTMLElement} element
 * @param {string} url
 * @param {number} [interval]
 */
export function watchIdleNotice(element, url, interval = NOTICE_INTERVAL_MS) {
    const look = async () => {
        try {
            const reply = await fetch(url, { cache: 'no-store' });
            const notice = reply.status === 200 ? await reply.json() : null;
            const text = idleWarning(notice);
            element.textContent = text || '';
            element.hidden = !text;
        } catch {
            // The next look tries again.
        }
    };
    look();
    return setInterval(look, interval);
}
