// Guacamole instruction helpers for the tunnel benchmark: encode, a small streaming text parser, and instruction ends in received bytes.

const ASCII = /^[\x00-\x7f]*$/;

/** Length of `s` in Unicode code points (what Guacamole's LENGTH counts). */
export function codePoints(s) {
  if (ASCII.test(s)) return s.length;
  let n = 0;
  for (const _ of s) n++;
  return n;
}

/** `encode('size', 0, 1024, 768)` → `4.size,1.0,4.1024,3.768;` */
export function encode(...elements) {
  return elements.map((e) => { const s = String(e); return `${codePoints(s)}.${s}`; }).join(',') + ';';
}

/** Streaming parser of decoded text; calls `onInstruction(opcode, args)` per whole instruction. */
export class Parser {
  constructor(onInstruction) { this.on = onInstruction; this.buffer = ''; }

  push(text) {
    this.buffer += text;
    let start = 0;
    for (;;) {
      const parsed = parseAt(this.buffer, start);
      if (!parsed) break;
      start = parsed.next;
      this.on(parsed.elements[0], parsed.elements.slice(1));
    }
    this.buffer = this.buffer.slice(start);
  }
}

function parseAt(s, i) {
  const elements = [];
  for (;;) {
    const dot = s.indexOf('.', i);
    if (dot < 0) return null;
    const length = Number(s.slice(i, dot));
    if (!Number.isInteger(length) || dot === i) throw new Error(`bad length at ${i}`);
    let j = dot + 1;
    for (let k = 0; k < length; k++) j += s.codePointAt(j) > 0xffff ? 2 : 1;
    if (j >= s.length) return null;
    elements.push(s.slice(dot + 1, j));
    if (s[j] === ';') return { elements, next: j + 1 };
    if (s[j] !== ',') throw new Error(`bad terminator at ${j}`);
    i = j + 1;
  }
}

/**
 * Byte offsets just past each `;` in `buf` (UTF-8), with lengths counted in `unit`: 'codepoints'
 * (guacd, guacamole-common-js 1.6) or 'utf16' (guacamole-common-js 1.5, JavaScript's `length`:
 * a character outside the Basic Multilingual Plane counts 2). Returns { ends, error } where
 * error says where parsing stopped on malformed or truncated data. With `canonical`, also the
 * same instructions re-encoded with code-point lengths (to compare streams across units).
 */
export function instructionEnds(buf, unit = 'codepoints', canonical = false) {
  const ends = [];
  const parts = [];
  let p = 0;
  while (p < buf.length) {
    const start = p;
    const elements = [];
    for (;;) {
      let n = 0, d = p;
      while (d < buf.length && buf[d] >= 0x30 && buf[d] <= 0x39) n = n * 10 + buf[d++] - 0x30;
      if (d >= buf.length) return { ends, error: `truncated instruction at byte ${start}`, canonical: done(parts) };
      if (d === p || buf[d] !== 0x2e) return { ends, error: `bad length at byte ${p}`, canonical: done(parts) };
      p = d + 1;
      const valueStart = p;
      let points = 0;
      while (n > 0 && p < buf.length) {
        const b = buf[p];
        const step = b < 0x80 ? 1 : b < 0xe0 ? 2 : b < 0xf0 ? 3 : 4;
        const units = unit === 'utf16' && step === 4 ? 2 : 1;
        if (units > n) return { ends, error: `length splits a character at byte ${p}`, canonical: done(parts) };
        p += step;
        n -= units;
        points++;
      }
      if (p >= buf.length) return { ends, error: `truncated instruction at byte ${start}`, canonical: done(parts) };
      if (canonical) elements.push(`${points}.`, buf.subarray(valueStart, p));
      const t = buf[p++];
      if (t === 0x3b) {
        ends.push(p);
        if (canonical) parts.push(...joinElements(elements, ';'));
        break;
      }
      if (t !== 0x2c) return { ends, error: `bad terminator at byte ${p - 1}`, canonical: done(parts) };
      if (canonical) elements.push(',');
    }
  }
  return { ends, error: null, canonical: done(parts) };
}

function joinElements(elements, end) {
  return [...elements.map((e) => (typeof e === 'string' ? Buffer.from(e) : e)), Buffer.from(end)];
}

function done(parts) {
  return parts.length ? Buffer.concat(parts) : Buffer.alloc(0);
}
