// Tests parsing of the client link (#/client/<id>?token=…) with both id encodings.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { decodeBase64Id, parseClientIdentifier, parseClientLocation } from '../src/route.js';

const SHELL = { name: 'shell', type: 'c', dataSource: 'default' };
const DESKTOP = { name: 'desktop', type: 'c', dataSource: 'default' };

test('Exosphere ids (padded standard base64) decode', () => {
    // The exact links Exosphere builds (src/Helpers/Interaction.elm).
    assert.deepEqual(parseClientIdentifier('c2hlbGwAYwBkZWZhdWx0'), SHELL);
    assert.deepEqual(parseClientIdentifier('ZGVza3RvcABjAGRlZmF1bHQ='), DESKTOP);
});

test('upstream ids (unpadded base64url) decode', () => {
    assert.deepEqual(parseClientIdentifier('ZGVza3RvcABjAGRlZmF1bHQ'), DESKTOP);
    const b64url = Buffer.from('~~~??\0c\0default').toString('base64url');
    assert.match(b64url, /[-_]/, 'test id must use the url-safe alphabet');
    assert.deepEqual(parseClientIdentifier(b64url), { name: '~~~??', type: 'c', dataSource: 'default' });
    const std = Buffer.from('~~~??\0c\0default').toString('base64');
    assert.deepEqual(parseClientIdentifier(std), { name: '~~~??', type: 'c', dataSource: 'default' });
});

test('percent-encoded padding and UTF-8 names decode', () => {
    assert.deepEqual(parseClientIdentifier('ZGVza3RvcABjAGRlZmF1bHQ%3D'), DESKTOP);
    const id = Buffer.from('büro\0c\0default').toString('base64');
    assert.deepEqual(parseClientIdentifier(id), { name: 'büro', type: 'c', dataSource: 'default' });
});

test('invalid ids are rejected', () => {
    assert.equal(decodeBase64Id(''), null);
    assert.equal(decodeBase64Id('not base64!'), null);
    assert.equal(decodeBase64Id('a'), null);
    assert.equal(parseClientIdentifier(Buffer.from('shell').toString('base64')), null);
    assert.equal(parseClientIdentifier(Buffer.from('shell\0c').toString('base64')), null);
    assert.equal(parseClientIdentifier(Buffer.from('\0c\0default').toString('base64')), null);
});

test('token and id come from the fragment', () => {
    const token = '0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF';
    assert.deepEqual(parseClientLocation({ hash: `#/client/c2hlbGwAYwBkZWZhdWx0?token=${token}` }), {
        id: 'c2hlbGwAYwBkZWZhdWx0', identifier: SHELL, token,
    });
    const desktop = parseClientLocation({ hash: `#/client/ZGVza3RvcABjAGRlZmF1bHQ=?token=${token}`, search: '' });
    assert.deepEqual(desktop.identifier, DESKTOP);
    assert.equal(desktop.token, token);
});

test('token parsing keeps "+" and decodes escapes; other parameters are ignored', () => {
    const r = parseClientLocation({ hash: '#/client/c2hlbGwAYwBkZWZhdWx0?foo=1&token=a+b%2Fc&bar' });
    assert.equal(r.token, 'a+b/c');
    assert.deepEqual(r.identifier, SHELL);
    assert.deepEqual(parseClientLocation({ hash: '#/client/c2hlbGwAYwBkZWZhdWx0/?token=t' }).identifier, SHELL);
});

test('missing token, missing or bad id', () => {
    assert.equal(parseClientLocation({ hash: '#/client/c2hlbGwAYwBkZWZhdWx0' }).token, null);
    assert.equal(parseClientLocation({ hash: '#/client/c2hlbGwAYwBkZWZhdWx0?token=' }).token, null);
    assert.deepEqual(parseClientLocation({ hash: '', search: '' }), { id: null, identifier: null, token: null });
    assert.deepEqual(parseClientLocation({}), { id: null, identifier: null, token: null });
    const noId = parseClientLocation({ hash: '#/?token=abc' });
    assert.equal(noId.token, 'abc');
    assert.equal(noId.identifier, null);
    const badId = parseClientLocation({ hash: '#/client/!!!?token=abc' });
    assert.equal(badId.id, '!!!');
    assert.equal(badId.identifier, null);
});

test('a token in the real query string is a fallback only', () => {
    assert.equal(parseClientLocation({ hash: '#/client/c2hlbGwAYwBkZWZhdWx0', search: '?token=q' }).token, 'q');
    assert.equal(parseClientLocation({ hash: '#/client/c2hlbGwAYwBkZWZhdWx0?token=f', search: '?token=q' }).token, 'f');
});
