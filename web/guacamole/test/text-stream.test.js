// Tests the UTF-8 text streams: characters cut between blobs, characters outside the BMP, JSON.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createUtf8BlobDecoder, readJson, readText, utf8Blobs, writeText } from '../src/text-stream.js';

const b64 = (bytes) => Buffer.from(bytes).toString('base64');
const SAMPLE = 'é😀\u{20000}'; // 2-byte, 4-byte (emoji) and 4-byte (CJK extension B) characters

/** An input stream as guacamole-common-js hands it over: onblob(base64), onend(). */
function inputStream() {
    return { onblob: null, onend: null };
}

test('a 4-byte character split across two blobs decodes to the one character', () => {
    const bytes = Buffer.from('😀', 'utf8');
    assert.equal(bytes.length, 4);
    for (let cut = 1; cut < 4; cut++) {
        const d = createUtf8BlobDecoder();
        assert.equal(d.push(b64(bytes.subarray(0, cut))), '', `nothing complete after ${cut} bytes`);
        assert.equal(d.push(b64(bytes.subarray(cut))), '😀');
        assert.equal(d.finish(), '😀');
    }
});

test('a 4-byte character split over four one-byte blobs, in a stream', () => {
    const s = inputStream();
    let got = null;
    let acks = 0;
    readText(s, { onend: (text) => { got = text; }, onprogress: () => { acks++; } });
    for (const byte of Buffer.from('\u{20000}', 'utf8'))
        s.onblob(b64([byte]));
    s.onend();
    assert.equal(got, '\u{20000}');
    assert.equal(got.codePointAt(0), 0x20000);
    assert.equal(acks, 4, 'one progress call per blob (the listing acknowledges each)');
});

test('every split point of a mixed text round-trips exactly', () => {
    const text = `a ${SAMPLE} "q" \\ z`;
    const bytes = Buffer.from(text, 'utf8');
    for (let cut = 0; cut <= bytes.length; cut++) {
        const d = createUtf8BlobDecoder();
        d.push(b64(bytes.subarray(0, cut)));
        d.push(b64(bytes.subarray(cut)));
        assert.equal(d.finish(), text, `split at byte ${cut}`);
    }
});

test('U+1F600 is not cut to 16 bits (guacamole-common-js 1.5 gave U+F600)', () => {
    const d = createUtf8BlobDecoder();
    d.push(b64(Buffer.from('😀', 'utf8')));
    const text = d.finish();
    assert.equal(text.codePointAt(0), 0x1F600);
    assert.notEqual(text, '\uF600');
});

test('a truncated sequence at the end becomes U+FFFD instead of vanishing or throwing', () => {
    const d = createUtf8BlobDecoder();
    d.push(b64(Buffer.from('ok😀', 'utf8').subarray(0, 4)));
    assert.equal(d.finish(), 'ok\uFFFD');
});

test('a raw UTF-8 JSON listing (as guacd writes it) parses with exact names', () => {
    const listing = { [`/home/u/${SAMPLE}.bin`]: 'application/octet-stream', '/home/u/a"b\\c': 'x' };
    const bytes = Buffer.from(JSON.stringify(listing), 'utf8');
    const s = inputStream();
    let got = null;
    readJson(s, { onend: (v) => { got = v; }, onerror: (e) => { throw e; } });
    // Blobs of 5 bytes: several characters straddle blobs.
    for (let i = 0; i < bytes.length; i += 5)
        s.onblob(b64(bytes.subarray(i, i + 5)));
    s.onend();
    assert.deepEqual(got, listing);
});

test('a listing that is not JSON reports an error', () => {
    const s = inputStream();
    let error = null;
    readJson(s, { onend: () => assert.fail('not JSON'), onerror: (e) => { error = e; } });
    s.onblob(b64(Buffer.from('{"a":', 'utf8')));
    s.onend();
    assert.ok(error instanceof SyntaxError);
});

test('writing encodes characters outside the BMP as 4-byte UTF-8, not as two surrogates', () => {
    const sent = [];
    let ended = false;
    writeText({ sendBlob: (data) => sent.push(data), sendEnd: () => { ended = true; } }, SAMPLE);
    assert.ok(ended);
    const bytes = Buffer.concat(sent.map((d) => Buffer.from(d, 'base64')));
    assert.deepEqual([...bytes], [0xC3, 0xA9, 0xF0, 0x9F, 0x98, 0x80, 0xF0, 0xA0, 0x80, 0x80]);
    assert.equal(new TextDecoder('utf-8', { fatal: true }).decode(bytes), SAMPLE);
});

test('long text is written in blobs of at most 6048 bytes that decode back exactly', () => {
    const text = `${'😀'.repeat(3000)}${SAMPLE}`;
    const blobs = utf8Blobs(text);
    assert.ok(blobs.length > 1);
    for (const blob of blobs)
        assert.ok(Buffer.from(blob, 'base64').length <= 6048);
    const d = createUtf8BlobDecoder();
    for (const blob of blobs)
        d.push(blob);
    assert.equal(d.finish(), text);
});

test('empty text: no blob, just the end', () => {
    const sent = [];
    let ended = false;
    writeText({ sendBlob: (data) => sent.push(data), sendEnd: () => { ended = true; } }, '');
    assert.deepEqual(sent, []);
    assert.ok(ended);
});
