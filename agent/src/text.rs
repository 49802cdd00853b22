//! Small text helpers for error details: the last lines of what a command printed.

/// The last `n` non-empty lines of `text` (blank or whitespace-only lines skipped), oldest
/// first. Errors keep the end of a tool's output because that is where it says what went wrong.
pub fn last_lines(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

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
