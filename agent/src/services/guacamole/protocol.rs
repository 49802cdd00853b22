//! Guacamole protocol instructions: the wire encoding, and a streaming decoder that frames
//! and parses instructions arriving in arbitrary chunks from guacd or from a browser.
//!
//! Spec: <https://guacamole.apache.org/doc/gug/guacamole-protocol.html>. An instruction is
//! `LENGTH.VALUE,LENGTH.VALUE,...;` with the opcode first and nothing between instructions,
//! e.g. `4.size,1.0,4.1024,3.768;`. LENGTH counts Unicode code points of the UTF-8 VALUE, not
//! bytes, so the decoder counts characters and waits when one is split across two reads.
//! The tunnel's own instructions use the empty opcode: `0.,4.ping,13.1700000000000;`.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// The opcode of the tunnel's own ("internal") instructions: the empty string.
pub const INTERNAL_OPCODE: &str = "";

/// First argument of the internal ping, which the tunnel echoes back unchanged.
pub const PING: &str = "ping";

/// One Guacamole instruction: an opcode and its arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Instruction {
    /// The opcode, such as `size`; empty for the tunnel's internal instructions.
    pub opcode: String,
    /// The arguments, in order.
    pub args: Vec<String>,
}

impl Instruction {
    /// An instruction with `opcode` and `args`.
    pub fn new<I, S>(opcode: impl Into<String>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            opcode: opcode.into(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// An internal instruction (empty opcode) with `args`.
    pub fn internal<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::new(INTERNAL_OPCODE, args)
    }

    /// The internal ping `0.,4.ping,N.TIMESTAMP;`.
    pub fn ping(timestamp: impl Into<String>) -> Self {
        Self::internal([PING.to_owned(), timestamp.into()])
    }

    /// The internal instruction announcing the tunnel's UUID, the first message a browser
    /// receives: `0.,36.UUID;`.
    pub fn tunnel_uuid(uuid: impl Into<String>) -> Self {
        Self::internal([uuid.into()])
    }

    /// Whether this is one of the tunnel's own instructions (empty opcode).
    pub fn is_internal(&self) -> bool {
        self.opcode == INTERNAL_OPCODE
    }

    /// Whether this is the internal ping.
    pub fn is_ping(&self) -> bool {
        self.is_internal() && self.args.first().is_some_and(|arg| arg == PING)
    }

    /// The opcode followed by the arguments.
    pub fn elements(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.opcode.as_str()).chain(self.args.iter().map(String::as_str))
    }

    /// The wire form, e.g. `4.size,1.0,4.1024,3.768;`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        self.encode_into(&mut out);
        out
    }

    /// The wire form with lengths in `unit`.
    pub fn encode_counting(&self, unit: LengthUnit) -> String {
        let mut out = String::new();
        for (index, element) in self.elements().enumerate() {
            if index > 0 {
                out.push(',');
            }
            let length = match unit {
                LengthUnit::CodePoints => element.chars().count(),
                LengthUnit::Utf16 => element.encode_utf16().count(),
            };
            out.push_str(&length.to_string());
            out.push('.');
            out.push_str(element);
        }
        out.push(';');
        out
    }

    /// Append the wire form to `out`, so a sender can reuse one buffer.
    pub fn encode_into(&self, out: &mut String) {
        use fmt::Write;
        // Writing to a String cannot fail.
        let _ = write!(out, "{self}");
    }
}

impl fmt::Display for Instruction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, element) in self.elements().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}.{element}", element.chars().count())?;
        }
        f.write_str(";")
    }
}

impl FromStr for Instruction {
    type Err = DecodeError;

    /// Parse exactly one instruction, with the default limits.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut decoder = Decoder::new();
        decoder.push(text.as_bytes());
        let instruction = match decoder.next_frame() {
            Some(Ok(frame)) => frame.to_instruction(),
            Some(Err(error)) => return Err(error),
            None => {
                return Err(DecodeError::Truncated {
                    offset: 0,
                    pending: text.len(),
                })
            }
        };
        if decoder.pending_bytes() > 0 {
            return Err(DecodeError::TrailingData {
                offset: decoder.offset(decoder.start),
            });
        }
        Ok(instruction)
    }
}

/// What an element's LENGTH counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LengthUnit {
    /// Unicode code points: the protocol as guacd (and guacamole-common-js 1.6) speaks it.
    #[default]
    CodePoints,
    /// UTF-16 code units, as guacamole-common-js 1.5 counts (JavaScript's `length`): a
    /// character outside the Basic Multilingual Plane counts 2.
    Utf16,
}

/// Bounds on what a [`Decoder`] accepts, against a hostile or broken peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest instruction, in bytes from the first length digit to the `;`.
    pub max_instruction_bytes: usize,
    /// Most elements in one instruction, the opcode included.
    pub max_elements: usize,
    /// Most digits in one length prefix; a longer prefix (leading zeros too) is refused.
    pub max_length_digits: usize,
}

impl Limits {
    /// For instructions from guacd: `img` and `blob` carry large base64 payloads, so 4 MiB;
    /// `args` lists every connection parameter of a protocol, so generous on elements.
    pub const FROM_GUACD: Limits = Limits {
        max_instruction_bytes: 4 * 1024 * 1024,
        max_elements: 4096,
        max_length_digits: 7,
    };

    /// For instructions from a browser, which guacd itself parses with at most 8192
    /// characters (up to 4 bytes each), 128 elements and 5-digit lengths per instruction.
    pub const FROM_BROWSER: Limits = Limits {
        max_instruction_bytes: 8192 * 4,
        max_elements: 128,
        max_length_digits: 5,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::FROM_GUACD
    }
}

/// Why a byte stream is not valid Guacamole protocol. Offsets count bytes from the start of
/// the stream given to the [`Decoder`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// An element does not start with a decimal length.
    #[error("bad Guacamole element length at byte {offset}: expected a digit, found {}", show_byte(*.found))]
    BadLength {
        /// Where the offending byte is.
        offset: u64,
        /// The offending byte.
        found: u8,
    },
    /// A length prefix has more digits than allowed.
    #[error("Guacamole element length at byte {offset} has more than {max_digits} digits")]
    TooManyDigits {
        /// Where the first excess digit is.
        offset: u64,
        /// The limit.
        max_digits: usize,
    },
    /// A length prefix is not followed by `.`.
    #[error("bad Guacamole element length at byte {offset}: expected a digit or '.', found {}", show_byte(*.found))]
    MissingPeriod {
        /// Where the offending byte is.
        offset: u64,
        /// The offending byte.
        found: u8,
    },
    /// A value is not followed by `,` or `;`.
    #[error("bad Guacamole element end at byte {offset}: expected ',' or ';', found {}", show_byte(*.found))]
    BadTerminator {
        /// Where the offending byte is.
        offset: u64,
        /// The offending byte.
        found: u8,
    },
    /// A value is not valid UTF-8.
    #[error("invalid UTF-8 in a Guacamole element value at byte {offset}")]
    InvalidUtf8 {
        /// Where the first invalid byte is.
        offset: u64,
    },
    /// A declared element length cannot fit in what the size limit leaves of the instruction.
    #[error("Guacamole element of {length} characters declared at byte {offset} cannot fit in the instruction size limit of {limit} bytes")]
    ElementTooLong {
        /// Where the `.` ending the length prefix is.
        offset: u64,
        /// The declared length, in characters.
        length: u64,
        /// The size limit.
        limit: usize,
    },
    /// An instruction grows beyond the size limit.
    #[error(
        "Guacamole instruction starting at byte {offset} exceeds the size limit of {limit} bytes"
    )]
    InstructionTooLarge {
        /// Where the instruction starts.
        offset: u64,
        /// The size limit.
        limit: usize,
    },
    /// An instruction has more elements than allowed.
    #[error("Guacamole instruction starting at byte {offset} has more than {limit} elements")]
    TooManyElements {
        /// Where the instruction starts.
        offset: u64,
        /// The limit.
        limit: usize,
    },
    /// The input ended inside an instruction.
    #[error("input ended inside a Guacamole instruction starting at byte {offset} ({pending} bytes received)")]
    Truncated {
        /// Where the incomplete instruction starts.
        offset: u64,
        /// Bytes of it received.
        pending: usize,
    },
    /// More input follows the one instruction expected.
    #[error("unexpected data after the Guacamole instruction, at byte {offset}")]
    TrailingData {
        /// Where the extra data starts.
        offset: u64,
    },
}

impl DecodeError {
    /// Short stable reason, for logs, metrics and close reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadLength { .. } => "guac-bad-length",
            Self::TooManyDigits { .. } => "guac-too-many-digits",
            Self::MissingPeriod { .. } => "guac-missing-period",
            Self::BadTerminator { .. } => "guac-bad-terminator",
            Self::InvalidUtf8 { .. } => "guac-invalid-utf8",
            Self::ElementTooLong { .. } => "guac-element-too-long",
            Self::InstructionTooLarge { .. } => "guac-instruction-too-large",
            Self::TooManyElements { .. } => "guac-too-many-elements",
            Self::Truncated { .. } => "guac-truncated",
            Self::TrailingData { .. } => "guac-trailing-data",
        }
    }

    /// The stream offset the error points at.
    pub fn offset(&self) -> u64 {
        match self {
            Self::BadLength { offset, .. }
            | Self::TooManyDigits { offset, .. }
            | Self::MissingPeriod { offset, .. }
            | Self::BadTerminator { offset, .. }
            | Self::InvalidUtf8 { offset }
            | Self::ElementTooLong { offset, .. }
            | Self::InstructionTooLarge { offset, .. }
            | Self::TooManyElements { offset, .. }
            | Self::Truncated { offset, .. }
            | Self::TrailingData { offset } => *offset,
        }
    }
}

/// A byte for an error message: printable ASCII quoted, anything else in hex.
fn show_byte(byte: u8) -> String {
    if byte.is_ascii_graphic() || byte == b' ' {
        format!("'{}'", char::from(byte))
    } else {
        format!("byte 0x{byte:02x}")
    }
}

/// One complete instruction as received: its exact bytes, for relaying without re-encoding,
/// and its elements, located without copying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    raw: &'a str,
    /// Byte ranges of the elements' values within `raw`.
    elements: &'a [Range<usize>],
}

impl<'a> Frame<'a> {
    /// The instruction exactly as received, `;` included.
    pub fn as_str(&self) -> &'a str {
        self.raw
    }

    /// The instruction exactly as received, as bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.raw.as_bytes()
    }

    /// The opcode.
    pub fn opcode(&self) -> &'a str {
        self.element(0).unwrap_or_default()
    }

    /// The element at `index`, the opcode being element 0.
    pub fn element(&self, index: usize) -> Option<&'a str> {
        self.elements
            .get(index)
            .and_then(|range| self.raw.get(range.clone()))
    }

    /// The argument at `index` (0 is the first after the opcode).
    pub fn arg(&self, index: usize) -> Option<&'a str> {
        self.element(index.checked_add(1)?)
    }

    /// How many arguments follow the opcode.
    pub fn arg_count(&self) -> usize {
        self.elements.len().saturating_sub(1)
    }

    /// The arguments, in order.
    pub fn args(&self) -> impl ExactSizeIterator<Item = &'a str> + 'a {
        let raw = self.raw;
        self.elements
            .get(1..)
            .unwrap_or_default()
            .iter()
            .map(move |range| raw.get(range.clone()).unwrap_or_default())
    }

    /// Whether this is one of the tunnel's own instructions (empty opcode).
    pub fn is_internal(&self) -> bool {
        self.opcode() == INTERNAL_OPCODE
    }

    /// Whether this is the internal ping, which the tunnel echoes back as received.
    pub fn is_ping(&self) -> bool {
        self.is_internal() && self.arg(0) == Some(PING)
    }

    /// The parsed instruction, copying the elements.
    pub fn to_instruction(&self) -> Instruction {
        Instruction {
            opcode: self.opcode().to_owned(),
            args: self.args().map(str::to_owned).collect(),
        }
    }
}

impl fmt::Display for Frame<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.raw)
    }
}

/// Where the decoder is within the current instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Reading a length prefix: its value and digit count so far.
    Length { value: u64, digits: usize },
    /// Reading a value: characters still to come.
    Value { remaining: usize },
    /// Expecting `,` or `;` after a value.
    Terminator,
}

const NEW_ELEMENT: Scan = Scan::Length {
    value: 0,
    digits: 0,
};

/// A streaming decoder: [`push`](Decoder::push) bytes as they arrive, then call
/// [`next_frame`](Decoder::next_frame) (or [`next_instruction`](Decoder::next_instruction))
/// until it returns `None`. Scanning resumes where it stopped, so an instruction arriving in
/// many reads is scanned once, and no allocation happens per frame once the buffers have grown.
///
/// After an error the decoder is poisoned: it ignores further input and returns the same
/// error again; the caller should close the connection.
#[derive(Debug, Clone)]
pub struct Decoder {
    limits: Limits,
    unit: LengthUnit,
    /// Received bytes not yet handed out as frames (and the last frame handed out).
    buffer: Vec<u8>,
    /// Stream offset of `buffer[0]`, for error messages.
    buffer_offset: u64,
    /// Index in `buffer` where the instruction being scanned starts.
    start: usize,
    /// Index in `buffer` of the next byte to scan.
    position: usize,
    scan: Scan,
    /// Start of the value being scanned, relative to `start`.
    value_start: usize,
    /// Byte ranges of the values scanned so far, relative to `start`; reused across frames.
    elements: Vec<Range<usize>>,
    /// Whether `elements` still describes the frame last handed out.
    frame_handed_out: bool,
    error: Option<DecodeError>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder with the default limits ([`Limits::FROM_GUACD`]).
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// The same decoder, reading lengths in `unit`.
    pub fn counting(mut self, unit: LengthUnit) -> Self {
        self.unit = unit;
        self
    }

    /// A decoder with `limits`.
    pub fn with_limits(limits: Limits) -> Self {
        Self {
            limits,
            unit: LengthUnit::CodePoints,
            buffer: Vec::new(),
            buffer_offset: 0,
            start: 0,
            position: 0,
            scan: NEW_ELEMENT,
            value_start: 0,
            elements: Vec::new(),
            frame_handed_out: false,
            error: None,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The error that poisoned the decoder, if any.
    pub fn error(&self) -> Option<&DecodeError> {
        self.error.as_ref()
    }

    /// Bytes received but not yet handed out as a frame.
    pub fn pending_bytes(&self) -> usize {
        self.buffer.len().saturating_sub(self.start)
    }

    /// Append received bytes. Ignored once the decoder is poisoned.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.error.is_some() {
            return;
        }
        // Drop what was handed out, once per push rather than once per frame, so a chunk holding
        // many small instructions is not shifted once for each.
        if self.start > 0 {
            self.buffer.drain(..self.start);
            self.buffer_offset += self.start as u64;
            self.position = self.position.saturating_sub(self.start);
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete instruction, `None` until more bytes are pushed, or the error that
    /// poisoned the decoder.
    pub fn next_frame(&mut self) -> Option<Result<Frame<'_>, DecodeError>> {
        if let Some(error) = &self.error {
            return Some(Err(error.clone()));
        }
        if self.frame_handed_out {
            self.elements.clear();
            self.frame_handed_out = false;
        }
        match self.scan() {
            Ok(false) => None,
            Ok(true) => {
                let frame_start = self.start;
                self.start = self.position;
                let bytes = self
                    .buffer
                    .get(frame_start..self.position)
                    .unwrap_or_default();
                // Every value was validated while scanning and the rest is ASCII, so this only
                // fails on a decoder bug; it is reported rather than trusted.
                match std::str::from_utf8(bytes) {
                    Ok(raw) => {
                        self.frame_handed_out = true;
                        Some(Ok(Frame {
                            raw,
                            elements: &self.elements,
                        }))
                    }
                    Err(error) => {
                        let offset =
                            self.buffer_offset + (frame_start + error.valid_up_to()) as u64;
                        let error = DecodeError::InvalidUtf8 { offset };
                        self.error = Some(error.clone());
                        Some(Err(error))
                    }
                }
            }
            Err(error) => {
                self.error = Some(error.clone());
                Some(Err(error))
            }
        }
    }

    /// The next complete instruction, parsed and copied; see [`next_frame`](Self::next_frame).
    pub fn next_instruction(&mut self) -> Option<Result<Instruction, DecodeError>> {
        self.next_frame()
            .map(|result| result.map(|frame| frame.to_instruction()))
    }

    /// Check that the stream may end here: no error, and nothing pending. Call it after
    /// `next_frame` returned `None`, when the peer closed the connection.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        match self.pending_bytes() {
            0 => Ok(()),
            pending => Err(DecodeError::Truncated {
                offset: self.offset(self.start),
                pending,
            }),
        }
    }

    fn offset(&self, index: usize) -> u64 {
        self.buffer_offset + index as u64
    }

    /// Fail if the instruction, at `more` bytes beyond the scan position at least, would
    /// exceed the size limit.
    fn check_size(&self, more: usize) -> Result<(), DecodeError> {
        let used = self.position.saturating_sub(self.start);
        if used.saturating_add(more) > self.limits.max_instruction_bytes {
            return Err(DecodeError::InstructionTooLarge {
                offset: self.offset(self.start),
                limit: self.limits.max_instruction_bytes,
            });
        }
        Ok(())
    }

    /// Scan from where the last call stopped: `Ok(true)` when an instruction is complete
    /// (ending at `position`), `Ok(false)` when more bytes are needed.
    fn scan(&mut self) -> Result<bool, DecodeError> {
        loop {
            match self.scan {
                Scan::Length { value, digits } => {
                    let Some(&byte) = self.buffer.get(self.position) else {
                        return Ok(false);
                    };
                    match byte {
                        b'0'..=b'9' => {
                            if digits >= self.limits.max_length_digits {
                                return Err(DecodeError::TooManyDigits {
                                    offset: self.offset(self.position),
                                    max_digits: self.limits.max_length_digits,
                                });
                            }
                            let value = value
                                .saturating_mul(10)
                                .saturating_add(u64::from(byte - b'0'));
                            self.position += 1;
                            self.scan = Scan::Length {
                                value,
                                digits: digits + 1,
                            };
                            // The '.' and a terminator must still fit.
                            self.check_size(2)?;
                        }
                        b'.' if digits > 0 => {
                            let period = self.position;
                            self.position += 1;
                            let used = self.position - self.start;
                            // Each character takes at least one byte, and a terminator follows.
                            let room = self
                                .limits
                                .max_instruction_bytes
                                .saturating_sub(used.saturating_add(1));
                            let remaining = match usize::try_from(value) {
                                Ok(remaining) if remaining <= room => remaining,
                                _ => {
                                    return Err(DecodeError::ElementTooLong {
                                        offset: self.offset(period),
                                        length: value,
                                        limit: self.limits.max_instruction_bytes,
                                    })
                                }
                            };
                            self.value_start = used;
                            self.scan = Scan::Value { remaining };
                        }
                        _ if digits == 0 => {
                            return Err(DecodeError::BadLength {
                                offset: self.offset(self.position),
                                found: byte,
                            })
                        }
                        _ => {
                            return Err(DecodeError::MissingPeriod {
                                offset: self.offset(self.position),
                                found: byte,
                            })
                        }
                    }
                }
                Scan::Value { remaining: 0 } => {
                    let value_end = self.position - self.start;
                    self.elements.push(self.value_start..value_end);
                    self.scan = Scan::Terminator;
                }
                Scan::Value { remaining } => {
                    let unscanned = self.buffer.get(self.position..).unwrap_or_default();
                    let chars = scan_chars(unscanned, remaining, self.unit);
                    self.position += chars.bytes;
                    let remaining = remaining.saturating_sub(chars.count);
                    self.scan = Scan::Value { remaining };
                    // Size before validity, so the error does not depend on how the input
                    // was split into chunks: multi-byte characters can exceed the limit before
                    // the invalid byte, and a chunk boundary there would have caught it.
                    self.check_size(remaining.saturating_add(1))?;
                    if let Some(invalid) = chars.invalid_at {
                        return Err(DecodeError::InvalidUtf8 {
                            offset: self.offset(self.position) + invalid as u64,
                        });
                    }
                    if remaining > 0 {
                        return Ok(false);
                    }
                }
                Scan::Terminator => {
                    let Some(&byte) = self.buffer.get(self.position) else {
                        return Ok(false);
                    };
                    match byte {
                        b',' => {
                            if self.elements.len() >= self.limits.max_elements {
                                return Err(DecodeError::TooManyElements {
                                    offset: self.offset(self.start),
                                    limit: self.limits.max_elements,
                                });
                            }
                            self.position += 1;
                            self.scan = NEW_ELEMENT;
                            // The shortest next element, `0.;`, must still fit.
                            self.check_size(3)?;
                        }
                        b';' => {
                            self.position += 1;
                            self.scan = NEW_ELEMENT;
                            return Ok(true);
                        }
                        _ => {
                            return Err(DecodeError::BadTerminator {
                                offset: self.offset(self.position),
                                found: byte,
                            })
                        }
                    }
                }
            }
        }
    }
}

/// What [`scan_chars`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ScannedChars {
    /// Bytes of whole, valid characters.
    bytes: usize,
    /// How many characters those bytes hold.
    count: usize,
    /// Where invalid UTF-8 starts, relative to the end of `bytes`, when it stopped the scan.
    invalid_at: Option<usize>,
}

/// Scan up to `wanted` whole UTF-8 characters (counted in `unit`) at the front of `input`,
/// stopping early at the end of `input` (possibly before a character cut short) or at invalid
/// UTF-8. In UTF-16 units, a length that ends between the two halves of a character outside the
/// Basic Multilingual Plane is invalid.
fn scan_chars(input: &[u8], wanted: usize, unit: LengthUnit) -> ScannedChars {
    let mut scanned = ScannedChars {
        bytes: 0,
        count: 0,
        invalid_at: None,
    };
    while scanned.count < wanted {
        let rest = input.get(scanned.bytes..).unwrap_or_default();
        if rest.is_empty() {
            break;
        }
        // A run of N bytes holds at most N characters (and at most N UTF-16 units), so this
        // window never reaches past the value; std's validator is fast on long ASCII runs such
        // as base64 payloads.
        let window = rest
            .get(..rest.len().min(wanted - scanned.count))
            .unwrap_or_default();
        let valid = match std::str::from_utf8(window) {
            Ok(_) => window.len(),
            Err(error) => error.valid_up_to(),
        };
        scanned.bytes += valid;
        scanned.count += count_units(window.get(..valid).unwrap_or_default(), unit);
        if valid == window.len() {
            if scanned.count > wanted {
                // Only a 4-byte character counting 2 can overshoot: it was cut in half.
                scanned.invalid_at = Some(0);
                break;
            }
            continue;
        }
        // The window ends in a character it cut short or in invalid bytes: look at that one
        // character in the whole input.
        match first_char(input.get(scanned.bytes..).unwrap_or_default()) {
            FirstChar::Complete(len) => {
                let units = if len == 4 && unit == LengthUnit::Utf16 {
                    2
                } else {
                    1
                };
                if scanned.count + units > wanted {
                    scanned.invalid_at = Some(0);
                    break;
                }
                scanned.bytes += len;
                scanned.count += units;
            }
            FirstChar::Incomplete => break,
            FirstChar::Invalid => {
                scanned.invalid_at = Some(0);
                break;
            }
        }
    }
    scanned
}

/// Characters in valid UTF-8: the bytes that are not continuation bytes.
fn count_chars(utf8: &[u8]) -> usize {
    utf8.iter().filter(|&&byte| byte & 0xC0 != 0x80).count()
}

/// Length units in valid UTF-8: characters, plus one per 4-byte character in UTF-16.
fn count_units(utf8: &[u8], unit: LengthUnit) -> usize {
    let chars = count_chars(utf8);
    match unit {
        LengthUnit::CodePoints => chars,
        LengthUnit::Utf16 => chars + utf8.iter().filter(|&&byte| byte >= 0xF0).count(),
    }
}

/// Whether `text` has a character outside the Basic Multilingual Plane (where code points and
/// UTF-16 units differ).
pub fn has_astral(text: &str) -> bool {
    text.bytes().any(|byte| byte >= 0xF0)
}

/// The first character of some bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstChar {
    /// Valid, of this many bytes.
    Complete(usize),
    /// Valid so far, but more bytes are needed (or there are none).
    Incomplete,
    /// Not valid UTF-8.
    Invalid,
}

fn first_char(bytes: &[u8]) -> FirstChar {
    let probe = bytes.get(..bytes.len().min(4)).unwrap_or_default();
    let valid = match std::str::from_utf8(probe) {
        Ok(text) => text,
        Err(error) if error.valid_up_to() > 0 => {
            std::str::from_utf8(probe.get(..error.valid_up_to()).unwrap_or_default())
                .unwrap_or_default()
        }
        Err(error) if error.error_len().is_some() => return FirstChar::Invalid,
        Err(_) => return FirstChar::Incomplete,
    };
    match valid.chars().next() {
        Some(first) => FirstChar::Complete(first.len_utf8()),
        None => FirstChar::Incomplete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode `chunks` pushed one after another: every frame (raw text) or the error that
    /// stopped decoding.
    fn decode_chunks(
        limits: Limits,
        chunks: &[&[u8]],
    ) -> Vec<Result<(String, Instruction), DecodeError>> {
        let mut decoder = Decoder::with_limits(limits);
        let mut results = Vec::new();
        for chunk in chunks {
            decoder.push(chunk);
            while let Some(result) = decoder.next_frame() {
                let failed = result.is_err();
                results
                    .push(result.map(|frame| (frame.as_str().to_owned(), frame.to_instruction())));
                if failed {
                    return results;
                }
            }
        }
        results
    }

    fn decode_all(input: &[u8]) -> Vec<Result<(String, Instruction), DecodeError>> {
        decode_chunks(Limits::default(), &[input])
    }

    fn first_error(limits: Limits, input: &[u8]) -> DecodeError {
        match decode_chunks(limits, &[input]).pop() {
            Some(Err(error)) => error,
            other => panic!("expected an error for {input:?}, got {other:?}"),
        }
    }

    #[test]
    fn encodes_the_spec_example() {
        let size = Instruction::new("size", ["0", "1024", "768"]);
        assert_eq!(size.encode(), "4.size,1.0,4.1024,3.768;");
        assert_eq!(size.to_string(), size.encode());
    }

    #[test]
    fn encodes_empty_values_and_internal_instructions() {
        assert_eq!(Instruction::new("", Vec::<String>::new()).encode(), "0.;");
        assert_eq!(Instruction::new("nop", [""]).encode(), "3.nop,0.;");
        let ping = Instruction::ping("1700000000000");
        assert_eq!(ping.encode(), "0.,4.ping,13.1700000000000;");
        assert!(ping.is_internal() && ping.is_ping());
        let uuid = Instruction::tunnel_uuid("e1d3f0c6-3b5b-4b3f-9d1e-2a6d2c1f3e4a");
        assert_eq!(uuid.encode(), "0.,36.e1d3f0c6-3b5b-4b3f-9d1e-2a6d2c1f3e4a;");
        assert!(uuid.is_internal() && !uuid.is_ping());
        assert!(!Instruction::new("ping", ["1"]).is_internal());
    }

    #[test]
    fn lengths_count_code_points_not_bytes() {
        assert_eq!(Instruction::new("é", ["😀"]).encode(), "1.é,1.😀;");
        assert_eq!("😀".len(), 4);
        assert_eq!(
            Instruction::new("clipboard", ["a😀é,;."]).encode(),
            "9.clipboard,6.a😀é,;.;"
        );
        let decoded: Instruction = "1.é,1.😀,2.a😀;".parse().unwrap();
        assert_eq!(decoded, Instruction::new("é", ["😀", "a😀"]));
    }

    #[test]
    fn decodes_the_spec_example_with_its_raw_frame() {
        let mut decoder = Decoder::new();
        decoder.push(b"4.size,1.0,4.1024,3.768;");
        let frame = decoder.next_frame().unwrap().unwrap();
        assert_eq!(frame.as_str(), "4.size,1.0,4.1024,3.768;");
        assert_eq!(frame.opcode(), "size");
        assert_eq!(frame.args().collect::<Vec<_>>(), ["0", "1024", "768"]);
        assert_eq!(frame.arg_count(), 3);
        assert_eq!(frame.arg(2), Some("768"));
        assert_eq!(frame.arg(3), None);
        assert!(!frame.is_internal());
        assert!(decoder.next_frame().is_none());
        assert_eq!(decoder.finish(), Ok(()));
    }

    #[test]
    fn decodes_back_to_back_instructions_in_one_chunk() {
        let input = "0.,4.ping,13.1700000000000;4.sync,8.12345678;0.;3.nop,0.;";
        let results = decode_all(input.as_bytes());
        let frames: Vec<_> = results.into_iter().map(Result::unwrap).collect();
        let raws: Vec<&str> = frames.iter().map(|(raw, _)| raw.as_str()).collect();
        assert_eq!(
            raws,
            [
                "0.,4.ping,13.1700000000000;",
                "4.sync,8.12345678;",
                "0.;",
                "3.nop,0.;"
            ]
        );
        assert!(frames[0].1.is_ping());
        assert_eq!(frames[2].1, Instruction::new("", Vec::<String>::new()));
        assert_eq!(frames[3].1, Instruction::new("nop", [""]));
    }

    #[test]
    fn frame_recognises_the_ping() {
        let mut decoder = Decoder::with_limits(Limits::FROM_BROWSER);
        decoder.push(b"0.,4.ping,13.1700000000000;");
        let frame = decoder.next_frame().unwrap().unwrap();
        assert!(frame.is_internal() && frame.is_ping());
        assert_eq!(frame.to_string(), "0.,4.ping,13.1700000000000;");
    }

    #[test]
    fn values_may_hold_separators_and_digits() {
        let instruction = Instruction::new("4.a;", ["1,2;3.", ";;", ",", "."]);
        let encoded = instruction.encode();
        assert_eq!(encoded, "4.4.a;,6.1,2;3.,2.;;,1.,,1..;");
        assert_eq!(encoded.parse::<Instruction>(), Ok(instruction));
    }

    #[test]
    fn every_split_point_gives_the_same_frames() {
        // Boundaries inside UTF-8 sequences, length prefixes, right after '.', at terminators.
        let input =
            "4.size,1.0,4.1024,3.768;9.clipboard,3.é😀x;0.,4.ping,13.1700000000000;".as_bytes();
        let whole = decode_all(input);
        assert_eq!(whole.len(), 3);
        assert!(whole.iter().all(Result::is_ok), "{whole:?}");
        for split in 0..=input.len() {
            let (head, tail) = input.split_at(split);
            assert_eq!(
                decode_chunks(Limits::default(), &[head, tail]),
                whole,
                "split at {split}"
            );
        }
        let bytewise: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(decode_chunks(Limits::default(), &bytewise), whole);
    }

    #[test]
    fn waits_for_the_rest_of_a_split_character() {
        let input = "3.key,1.😀;".as_bytes();
        let emoji_start = input.iter().position(|&byte| byte == 0xF0).unwrap();
        let mut decoder = Decoder::new();
        for cut in 1..4 {
            decoder = Decoder::new();
            decoder.push(&input[..emoji_start + cut]);
            assert!(
                decoder.next_frame().is_none(),
                "cut {cut} bytes into the emoji"
            );
            decoder.push(&input[emoji_start + cut..]);
            let frame = decoder.next_frame().unwrap().unwrap();
            assert_eq!(frame.arg(0), Some("😀"));
        }
        assert!(decoder.next_frame().is_none());
    }

    #[test]
    fn waits_inside_a_length_prefix_and_after_the_period() {
        let mut decoder = Decoder::new();
        decoder.push(b"1");
        assert!(decoder.next_frame().is_none());
        decoder.push(b"2");
        assert!(decoder.next_frame().is_none());
        decoder.push(b".");
        assert!(decoder.next_frame().is_none());
        decoder.push(b"hello world!");
        assert!(decoder.next_frame().is_none());
        decoder.push(b";4.n");
        let frame = decoder.next_frame().unwrap().unwrap();
        assert_eq!(frame.as_str(), "12.hello world!;");
        assert!(decoder.next_frame().is_none());
        assert_eq!(
            decoder.finish(),
            Err(DecodeError::Truncated {
                offset: 16,
                pending: 3
            })
        );
    }

    #[test]
    fn accepts_leading_zeros_within_the_digit_limit() {
        assert_eq!("01.a,000.;".parse(), Ok(Instruction::new("a", [""])));
    }

    #[test]
    fn rejects_a_non_digit_length() {
        let error = first_error(Limits::default(), b"4.size;x.abc;");
        assert_eq!(
            error,
            DecodeError::BadLength {
                offset: 7,
                found: b'x'
            }
        );
        assert_eq!(error.reason(), "guac-bad-length");
        assert_eq!(
            error.to_string(),
            "bad Guacamole element length at byte 7: expected a digit, found 'x'"
        );
        // A period without digits is a missing length too.
        assert_eq!(
            first_error(Limits::default(), b".;"),
            DecodeError::BadLength {
                offset: 0,
                found: b'.'
            }
        );
        assert_eq!(
            first_error(Limits::default(), b";"),
            DecodeError::BadLength {
                offset: 0,
                found: b';'
            }
        );
    }

    #[test]
    fn rejects_a_missing_period() {
        let error = first_error(Limits::default(), b"4size;");
        assert_eq!(
            error,
            DecodeError::MissingPeriod {
                offset: 1,
                found: b's'
            }
        );
        assert_eq!(error.reason(), "guac-missing-period");
        assert!(error.to_string().contains("byte 1"), "{error}");
    }

    #[test]
    fn rejects_a_wrong_terminator() {
        let error = first_error(Limits::default(), b"4.size:1.0;");
        assert_eq!(
            error,
            DecodeError::BadTerminator {
                offset: 6,
                found: b':'
            }
        );
        assert_eq!(error.reason(), "guac-bad-terminator");
        // A length one short leaves a value byte where the terminator belongs.
        assert_eq!(
            first_error(Limits::default(), "1.😀😀;".as_bytes()),
            DecodeError::BadTerminator {
                offset: 6,
                found: 0xF0
            }
        );
        assert!(first_error(Limits::default(), b"1.a\n")
            .to_string()
            .ends_with("found byte 0x0a"));
    }

    #[test]
    fn rejects_invalid_utf8() {
        let cases: [(&[u8], u64); 6] = [
            (b"3.a\x80b;", 3),           // lone continuation byte
            (b"2.\xC0\x80;", 2),         // overlong encoding of NUL
            (b"1.\xED\xA0\x80;", 2),     // UTF-16 surrogate
            (b"1.\xF5\x80\x80\x80;", 2), // beyond U+10FFFF
            (b"2.a\xE2\x82;", 3),        // sequence cut short by the terminator
            (b"4.size,1.\xFF;", 9),      // never valid
        ];
        for (input, offset) in cases {
            let error = first_error(Limits::default(), input);
            assert_eq!(error, DecodeError::InvalidUtf8 { offset }, "{input:?}");
            assert_eq!(error.reason(), "guac-invalid-utf8");
        }
    }

    #[test]
    fn rejects_too_many_length_digits() {
        let limits = Limits::FROM_BROWSER;
        let error = first_error(limits, b"123456.");
        assert_eq!(
            error,
            DecodeError::TooManyDigits {
                offset: 5,
                max_digits: 5
            }
        );
        assert_eq!(error.reason(), "guac-too-many-digits");
        // Leading zeros count: they are how an endless prefix would be sent.
        assert_eq!(
            first_error(limits, b"000001.a;").reason(),
            "guac-too-many-digits"
        );
    }

    #[test]
    fn rejects_a_length_beyond_the_size_limit_before_reading_the_value() {
        let limits = Limits {
            max_instruction_bytes: 16,
            ..Limits::FROM_BROWSER
        };
        // "4.size," is 7 bytes; "8." brings 9, leaving room for 6 characters and the ';'.
        let error = first_error(limits, b"4.size,8.");
        assert_eq!(
            error,
            DecodeError::ElementTooLong {
                offset: 8,
                length: 8,
                limit: 16
            }
        );
        assert_eq!(error.reason(), "guac-element-too-long");
        assert_eq!(
            decode_chunks(limits, &[b"4.size,6.abcdef;"])[0]
                .as_ref()
                .unwrap()
                .0,
            "4.size,6.abcdef;"
        );
        assert_eq!(
            first_error(limits, b"99999.").reason(),
            "guac-element-too-long"
        );
    }

    #[test]
    fn rejects_an_instruction_growing_beyond_the_size_limit() {
        let limits = Limits {
            max_instruction_bytes: 12,
            ..Limits::FROM_BROWSER
        };
        // Fits by characters, not by bytes: the third emoji goes past 12 bytes.
        let error = first_error(limits, "3.😀😀😀;".as_bytes());
        assert_eq!(
            error,
            DecodeError::InstructionTooLarge {
                offset: 0,
                limit: 12
            }
        );
        assert_eq!(error.reason(), "guac-instruction-too-large");
        // Many small elements.
        let error = first_error(limits, b"4.size,1.0,1.0,1.0;");
        assert_eq!(
            error,
            DecodeError::InstructionTooLarge {
                offset: 0,
                limit: 12
            }
        );
        // Exactly at the limit is fine, and the offset is the instruction's.
        let results = decode_chunks(limits, &[b"1.a,1.b,1.c;1.a,1.b,1.c,;"]);
        assert_eq!(results[0].as_ref().unwrap().0, "1.a,1.b,1.c;");
        assert_eq!(
            results[1],
            Err(DecodeError::InstructionTooLarge {
                offset: 12,
                limit: 12
            })
        );
    }

    #[test]
    fn rejects_too_many_elements() {
        let limits = Limits {
            max_elements: 3,
            ..Limits::FROM_BROWSER
        };
        assert!(decode_chunks(limits, &[b"1.a,1.b,1.c;"])[0].is_ok());
        let error = first_error(limits, b"1.a;1.a,1.b,1.c,1.d;");
        assert_eq!(
            error,
            DecodeError::TooManyElements {
                offset: 4,
                limit: 3
            }
        );
        assert_eq!(error.reason(), "guac-too-many-elements");
    }

    #[test]
    fn stays_poisoned_after_an_error() {
        let mut decoder = Decoder::new();
        decoder.push(b"1.a;x");
        assert!(decoder.next_frame().unwrap().is_ok());
        let error = decoder.next_frame().unwrap().unwrap_err();
        decoder.push(b"1.a;");
        assert_eq!(decoder.next_frame().unwrap().unwrap_err(), error);
        assert_eq!(decoder.next_instruction().unwrap().unwrap_err(), error);
        assert_eq!(decoder.error(), Some(&error));
        assert_eq!(decoder.finish(), Err(error));
    }

    #[test]
    fn error_offsets_count_from_the_start_of_the_stream() {
        let mut decoder = Decoder::new();
        for _ in 0..3 {
            decoder.push(b"4.sync,1.1;");
            while let Some(frame) = decoder.next_frame() {
                frame.unwrap();
            }
        }
        decoder.push(b"4.sync?");
        assert_eq!(
            decoder.next_frame().unwrap().unwrap_err(),
            DecodeError::BadTerminator {
                offset: 39,
                found: b'?'
            }
        );
    }

    #[test]
    fn parses_exactly_one_instruction_from_a_string() {
        assert_eq!(
            "4.size,1.0;".parse::<Instruction>(),
            Ok(Instruction::new("size", ["0"]))
        );
        let error = "4.size,1.0;4.sync;".parse::<Instruction>().unwrap_err();
        assert_eq!(error, DecodeError::TrailingData { offset: 11 });
        assert_eq!(error.reason(), "guac-trailing-data");
        let error = "4.size,1.0".parse::<Instruction>().unwrap_err();
        assert_eq!(
            error,
            DecodeError::Truncated {
                offset: 0,
                pending: 10
            }
        );
        assert_eq!(error.reason(), "guac-truncated");
        assert_eq!(
            "".parse::<Instruction>().unwrap_err().reason(),
            "guac-truncated"
        );
    }

    #[test]
    fn utf16_lengths_count_astral_characters_twice() {
        let mut decoder = Decoder::new().counting(LengthUnit::Utf16);
        // "😀a" is 3 UTF-16 units; split inside the emoji's bytes.
        let input = "4.name,3.😀a;".as_bytes();
        decoder.push(&input[..9]);
        assert!(decoder.next_frame().is_none());
        decoder.push(&input[9..]);
        let frame = decoder.next_frame().unwrap().unwrap();
        assert_eq!(frame.arg(0), Some("😀a"));
        assert_eq!(
            Instruction::new("name", ["😀a"]).encode_counting(LengthUnit::Utf16),
            "4.name,3.😀a;"
        );
        // A length ending between the two halves of the emoji is refused.
        let mut decoder = Decoder::new().counting(LengthUnit::Utf16);
        decoder.push("4.name,1.😀;".as_bytes());
        assert_eq!(
            decoder.next_frame().unwrap().unwrap_err().reason(),
            "guac-invalid-utf8"
        );
        // Code points (the default) count it once.
        let mut decoder = Decoder::new();
        decoder.push("4.name,2.😀a;".as_bytes());
        assert_eq!(decoder.next_frame().unwrap().unwrap().arg(0), Some("😀a"));
        assert!(has_astral("😀") && !has_astral("é"));
    }

    #[test]
    fn scan_chars_stops_at_whole_characters() {
        let text = "aé😀".as_bytes();
        assert_eq!(
            scan_chars(text, 3, LengthUnit::CodePoints),
            ScannedChars {
                bytes: 7,
                count: 3,
                invalid_at: None
            }
        );
        assert_eq!(
            scan_chars(text, 2, LengthUnit::CodePoints),
            ScannedChars {
                bytes: 3,
                count: 2,
                invalid_at: None
            }
        );
        assert_eq!(
            scan_chars(&text[..5], 3, LengthUnit::CodePoints),
            ScannedChars {
                bytes: 3,
                count: 2,
                invalid_at: None
            }
        );
        assert_eq!(
            scan_chars(b"ab\xFFc", 4, LengthUnit::CodePoints),
            ScannedChars {
                bytes: 2,
                count: 2,
                invalid_at: Some(0)
            }
        );
        assert_eq!(
            scan_chars(b"", 4, LengthUnit::CodePoints),
            ScannedChars {
                bytes: 0,
                count: 0,
                invalid_at: None
            }
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Any text, or short text dense in the protocol's own characters and multi-byte ones.
        fn value() -> impl Strategy<Value = String> {
            prop_oneof![any::<String>(), "[0-9.,;aé😀\u{0}\u{10FFFF} ]{0,12}"]
        }

        fn instruction() -> impl Strategy<Value = Instruction> {
            (value(), prop::collection::vec(value(), 0..6))
                .prop_map(|(opcode, args)| Instruction { opcode, args })
        }

        /// Split `input` at the given points.
        fn split<'a>(input: &'a [u8], cuts: &[prop::sample::Index]) -> Vec<&'a [u8]> {
            let mut points: Vec<usize> =
                cuts.iter().map(|cut| cut.index(input.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut from = 0;
            for point in points {
                chunks.push(&input[from..point]);
                from = point;
            }
            chunks.push(&input[from..]);
            chunks
        }

        proptest! {
            #[test]
            fn encode_then_decode_in_any_chunks_round_trips(
                instructions in prop::collection::vec(instruction(), 0..6),
                cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
            ) {
                let encoded: Vec<String> = instructions.iter().map(Instruction::encode).collect();
                let stream = encoded.concat();
                let chunks = split(stream.as_bytes(), &cuts);
                let expected: Vec<_> = encoded
                    .iter()
                    .cloned()
                    .zip(instructions.iter().cloned())
                    .map(Ok)
                    .collect();
                prop_assert_eq!(decode_chunks(Limits::default(), &chunks), expected);
            }

            #[test]
            fn lengths_are_code_points(text in any::<String>()) {
                let encoded = Instruction::new(text.clone(), Vec::<String>::new()).encode();
                prop_assert_eq!(&encoded, &format!("{}.{};", text.chars().count(), text));
                let mut decoder = Decoder::new();
                decoder.push(encoded.as_bytes());
                let frame = decoder.next_frame().unwrap().unwrap();
                prop_assert_eq!(frame.opcode(), text.as_str());
            }

            #[test]
            fn arbitrary_bytes_decode_the_same_in_any_chunks(
                input in prop::collection::vec(any::<u8>(), 0..256),
                cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
                max_instruction_bytes in 0usize..64,
            ) {
                let limits = Limits { max_instruction_bytes, max_elements: 4, max_length_digits: 2 };
                for limits in [Limits::default(), limits] {
                    let whole = decode_chunks(limits, &[&input]);
                    prop_assert_eq!(&decode_chunks(limits, &split(&input, &cuts)), &whole);
                    for (raw, instruction) in whole.iter().filter_map(|result| result.as_ref().ok()) {
                        prop_assert!(raw.len() <= limits.max_instruction_bytes);
                        // Re-encoding is canonical (no leading zeros) and parses back the same.
                        prop_assert_eq!(&instruction.encode().parse::<Instruction>(), &Ok(instruction.clone()));
                    }
                }
            }

            #[test]
            fn protocol_like_bytes_decode_the_same_in_any_chunks(
                input in "([0-9]{1,2}[.][a-zé😀,;.]{0,4}[,;]){0,12}",
                cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
            ) {
                // Mostly well-formed, so decoding gets deep before any error.
                let whole = decode_chunks(Limits::FROM_BROWSER, &[input.as_bytes()]);
                let chunked = decode_chunks(Limits::FROM_BROWSER, &split(input.as_bytes(), &cuts));
                prop_assert_eq!(chunked, whole);
            }
        }
    }
}
