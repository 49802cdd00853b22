// Tests the mapping of Guacamole status codes to messages and reconnect decisions.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Code, describeStatus, describeTransferStatus, SESSION_EXPIRED_MESSAGE } from '../src/status.js';
import { createReconnectPolicy } from '../src/reconnect-policy.js';

test('769 from the tunnel means the token expired: exact message, no reconnect', () => {
    const s = describeStatus(769, 'tunnel');
    assert.equal(s.message, 'This session has expired. Reopen the connection from Exosphere.');
    assert.equal(s.message, SESSION_EXPIRED_MESSAGE);
    assert.equal(s.canReconnect, false);
    assert.equal(s.transient, false);
    assert.equal(describeStatus(769).message, SESSION_EXPIRED_MESSAGE);
});

test('769 from guacd (error instruction) is a remote login failure, not an expired token', () => {
    const s = describeStatus(769, 'remote');
    assert.notEqual(s.message, SESSION_EXPIRED_MESSAGE);
    assert.match(s.message, /rejected the login/);
    assert.equal(s.canReconnect, true);
});

test('server close reasons have distinct human messages', () => {
    const codes = [519, 520, 514, 515, 797];
    const messages = codes.map((c) => describeStatus(c, 'tunnel').message);
    assert.equal(new Set(messages).size, codes.length);
    assert.match(describeStatus(519).message, /could not be reached/);
    assert.match(describeStatus(520).message, /unavailable/);
    assert.match(describeStatus(514).message, /did not respond/);
    assert.match(describeStatus(515).message, /error/);
    assert.match(describeStatus(797).message, /Too many/);
    for (const c of codes)
        assert.equal(describeStatus(c).canReconnect, true);
});

test('transient codes allow an automatic reconnect, others do not', () => {
    for (const c of [512, 514, 515, 519, 520])
        assert.equal(describeStatus(c).transient, true, `code ${c}`);
    for (const c of [0, 769, 771, 797, 516, 522])
        assert.equal(describeStatus(c).transient, false, `code ${c}`);
});

test('unknown codes and bad input still produce a message', () => {
    assert.match(describeStatus(4242).message, /4242/);
    assert.equal(describeStatus(NaN).code, Code.SERVER_ERROR);
    assert.match(describeStatus(0).message, /ended/);
});

test('transfer errors', () => {
    assert.match(describeTransferStatus(0x0100), /not available/);
    assert.match(describeTransferStatus(0x0303, 'Permission denied'), /permission denied \[status 771\]/);
    assert.match(describeTransferStatus(0x0200, 'Unable to open file'), /transfer failed \(Unable to open file\) \[status 512\]/);
});

test('reconnect policy: once after a working session, again only after 10 s connected', () => {
    let t = 0;
    const p = createReconnectPolicy({ now: () => t });
    const transient = describeStatus(519);

    // Never before a session worked.
    assert.equal(p.closed(transient), false);

    // Working session drops: reconnect once.
    p.connected(); t += 2_000;
    assert.equal(p.closed(transient), true);

    // Reconnected session drops within 10 s: no second automatic reconnect.
    p.connected(); t += 3_000;
    assert.equal(p.closed(transient), false);

    // Manual reconnect restores the budget.
    p.manual();
    p.connected(); t += 1_000;
    assert.equal(p.closed(transient), true);

    // A reconnected session that stayed up 10 s restores it too.
    p.connected(); t += 10_000;
    assert.equal(p.closed(transient), true);
});

test('reconnect policy: never for 769, clean ends or failed attempts', () => {
    let t = 0;
    const p = createReconnectPolicy({ now: () => t });
    p.connected(); t += 1;
    assert.equal(p.closed(describeStatus(769, 'tunnel')), false);
    p.connected(); t += 1;
    assert.equal(p.closed(null), false);
    p.connected(); t += 1;
    assert.equal(p.closed(describeStatus(771)), false);
    // Attempt that never reached "connected".
    assert.equal(p.closed(describeStatus(520)), false);
});
