// The benchmark's fixed guacd → client stream (drawing frames of img/blob/end, small drawing ops, UTF-8 file names) and the UTF-8 split test.
import { createCipheriv, createHash } from 'node:crypto';
import { encode } from './protocol.mjs';

/** guacd's GUAC_PROTOCOL_BLOB_MAX_LENGTH: bytes of data per `blob` (8064 characters of base64). */
export const BLOB_BYTES = 6048;
/** Blobs per image: a 47 KiB PNG per frame. */
export const BLOBS_PER_IMAGE = 8;
/** The stream's last instruction; the client stops its clock when it arrives. */
export const END_MARKER = Buffer.from(encode('bench', 'done'));

/**
 * Frames until at least `targetBytes` of instruction text, then END_MARKER; as Buffers, one per
 * frame. The random bytes are an AES-CTR keystream under a zero key, so every process builds the
 * same stream.
 */
export function buildWorkload(targetBytes) {
  const random = createCipheriv('aes-128-ctr', Buffer.alloc(16), Buffer.alloc(16));
  const zeros = Buffer.alloc(BLOB_BYTES);
  const frames = [];
  let total = 0;
  for (let i = 0; total < targetBytes; i++) {
    const x = (i * 64) % 1024, y = (Math.floor(i / 16) * 64) % 768;
    let text = encode('img', 1, 14, 0, 'image/png', x, y);
    for (let b = 0; b < BLOBS_PER_IMAGE; b++) {
      text += encode('blob', 1, random.update(zeros).toString('base64'));
    }
    text += encode('end', 1);
    text += encode('copy', 0, x, y, 64, 64, 12, 0, (x + 64) % 1024, y);
    text += encode('rect', 0, x, y, 16, 16) + encode('cfill', 14, 0, i % 256, 128, 64, 255);
    if (i % 16 === 0) {
      // A download offer whose name has 2- and 4-byte UTF-8 characters.
      text += encode('file', 2, 'text/plain', `résumé café 😀 ${i}.txt`) + encode('end', 2);
    }
    text += encode('sync', 1700000000000 + i * 16);
    const frame = Buffer.from(text);
    frames.push(frame);
    total += frame.length;
  }
  frames.push(END_MARKER);
  return frames;
}

/** Length and SHA-256 of the workload's bytes. */
export function digest(frames) {
  const hash = createHash('sha256');
  let bytes = 0;
  for (const f of frames) { hash.update(f); bytes += f.length; }
  return { bytes, sha256: hash.digest('hex') };
}

/**
 * The UTF-8 split test: a `file` instruction whose name holds `é` and `😀`, written in three
 * pieces cut inside each of those characters (guacd sends the pieces with pauses between them).
 */
export function splitTest() {
  const bytes = Buffer.from(encode('file', 3, 'text/plain', 'é😀 split.txt') + encode('end', 3) + END_MARKER);
  const a = bytes.indexOf(Buffer.from('é')) + 1;   // between the two bytes of é
  const b = bytes.indexOf(Buffer.from('😀')) + 2;  // between the 2nd and 3rd of 😀's four bytes
  return { bytes, pieces: [bytes.subarray(0, a), bytes.subarray(a, b), bytes.subarray(b)] };
}
