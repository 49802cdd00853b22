//! Fuzz the Guacamole instruction decoder: it must never panic, must decode the same whether
//! the input arrives whole or in two chunks, and whatever it decodes must encode and decode
//! back to the same instruction.
#![no_main]

use exoagent::services::guacamole::protocol::{DecodeError, Decoder, Instruction, Limits};
use libfuzzer_sys::fuzz_target;

/// Tight limits, so the size, element and digit checks are reached by small inputs.
const SMALL_LIMITS: Limits = Limits {
    max_instruction_bytes: 64,
    max_elements: 4,
    max_length_digits: 2,
};

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let limits = if control & 0x80 == 0 {
        Limits::FROM_BROWSER
    } else {
        SMALL_LIMITS
    };
    // The low seven bits place the chunk boundary anywhere in the input.
    let split = usize::from(control & 0x7F) * input.len() / 0x7F;
    let (head, tail) = input.split_at(split.min(input.len()));

    let whole = decode(limits, &[input]);
    let chunked = decode(limits, &[head, tail]);
    assert_eq!(whole, chunked, "decoding depends on the split at {split}");

    for (raw, instruction) in whole.iter().filter_map(|result| result.as_ref().ok()) {
        assert!(raw.len() <= limits.max_instruction_bytes);
        assert_eq!(raw.parse::<Instruction>().as_ref(), Ok(instruction));
        let encoded = instruction.encode();
        assert_eq!(encoded.parse::<Instruction>().as_ref(), Ok(instruction));
    }
});

/// Every frame (raw text and instruction) decoded from `chunks`, then the error if any.
fn decode(limits: Limits, chunks: &[&[u8]]) -> Vec<Result<(String, Instruction), DecodeError>> {
    let mut decoder = Decoder::with_limits(limits);
    let mut results = Vec::new();
    for chunk in chunks {
        decoder.push(chunk);
        while let Some(result) = decoder.next_frame() {
            let failed = result.is_err();
            results.push(result.map(|frame| (frame.as_str().to_owned(), frame.to_instruction())));
            if failed {
                return results;
            }
        }
    }
    results
}
