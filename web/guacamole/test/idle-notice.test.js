// Tests the idle warning the page shows from the agent's notice.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { idleWarning } from '../src/idle-notice.js';

const clock = (ms) => `T${ms}`;

test('a pending shelve is a warning naming both times', () => {
    const text = idleWarning({ state: 'shelve-pending', idle_since_ms: 1000, action_at_ms: 2000 }, clock);
    assert.match(text, /idle since T1000 and will be shelved at T2000 unless there is activity/);
});

test('shelving says what to do; active and plain idle say nothing', () => {
    assert.match(idleWarning({ state: 'shelving', idle_since_ms: 1, action_at_ms: 2 }, clock), /being shelved/);
    assert.equal(idleWarning({ state: 'idle', idle_since_ms: 1 }, clock), null);
    assert.equal(idleWarning({ state: 'active' }, clock), null);
    assert.equal(idleWarning(null, clock), null);
    assert.equal(idleWarning({ state: 'shelve-pending', action_at_ms: 'soon' }, clock), null);
});
