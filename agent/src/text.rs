//! Small text helpers for error details: the last lines of what a command printed, and outside
//! text made safe to print on a terminal line.

use crate::model::truncate_chars;

/// The last `n` non-empty lines of `text` (blank or whitespace-only lines skipped), oldest
/// first. Errors keep the end of a tool's output because that is where it says what went wrong.
pub fn last_lines(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// `text` on one line, at most `max` characters: line breaks and tabs become spaces (runs of
/// them one), every other control character (C0, DEL, C1: ESC starts terminal sequences, CSI
/// is U+009B) is dropped, and so are the invisible format characters that could reorder or
/// hide what a line shows (zero-width, bidirectional controls, line/paragraph separators).
pub fn clean(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max * 4));
    let mut space = false;
    for c in text.trim().chars() {
        if matches!(c, '\n' | '\r' | '\t') || c == ' ' {
            space = true;
        } else if !c.is_control() && !invisible(c) {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.push(c);
        }
    }
    truncate_chars(&out, max)
}

/// Zero-width characters, bidirectional embeddings, overrides and isolates, the line and
/// paragraph separators, and the byte-order mark.
fn invisible(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_drops_invisible_format_characters() {
        assert_eq!(clean("a\u{202E}b\u{200B}c\u{2028}d\u{FEFF}", 20), "abcd");
    }

    #[test]
    fn keeps_the_last_non_empty_lines_in_order() {
        assert_eq!(last_lines("a\nb\n\n  \nc\n", 2), ["b", "c"]);
        assert_eq!(last_lines("a\r\nb", 5), ["a", "b"]);
        assert_eq!(last_lines("a\nb\n", 0), Vec::<&str>::new());
        assert_eq!(last_lines("", 3), Vec::<&str>::new());
        assert_eq!(last_lines("\n\n", 3), Vec::<&str>::new());
    }

    #[test]
    fn keeps_indentation_and_trailing_spaces() {
        assert_eq!(last_lines("x\n  indented \n", 1), ["  indented "]);
    }
}
