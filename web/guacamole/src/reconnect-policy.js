// Decides when a closed session is reconnected automatically (once, guarded by a 10 s window).

/**
 * Automatic-reconnect policy:
 * - only after a session that reached "connected" closes abnormally with a transient code
 *   (never for 769 token expiry, permission or "too many" errors, never on a clean end);
 * - once: the budget is used up by an automatic reconnect and comes back only when a session
 *   then stays connected for `windowMs` (10 s), or when the user reconnects by hand.
 *
 * @param {{ windowMs?: number, now?: () => number }} [options]
 */
export function createReconnectPolicy({ windowMs = 10_000, now = () => Date.now() } = {}) {
    let used = false;
    let connectedAt = null;

    return {
        /** A session reached "connected". */
        connected() {
            connectedAt = now();
        },

        /** The user asked to reconnect: restore the budget. */
        manual() {
            used = false;
            connectedAt = null;
        },

        /**
         * A session closed. Returns true when the caller should reconnect automatically.
         * @param {{ transient: boolean, canReconnect: boolean } | null} status null for a clean close
         */
        closed(status) {
            const wasConnected = connectedAt !== null;
            if (wasConnected && now() - connectedAt >= windowMs)
                used = false;
            connectedAt = null;
            if (!status || !status.transient || !status.canReconnect || !wasConnected || used)
                return false;
            used = true;
            return true;
        },
    };
}
