//! The CRI container log format: one entry per line,
//! `<RFC 3339 time with nanoseconds> <stdout|stderr> <F|P> <content>`, `P` marking a partial
//! line continued by the next entry.

/// Lines longer than this are split into partial entries (as containerd does).
pub const MAX_LINE: usize = 16 * 1024;

/// The log entries (with their newlines) for one line of output, without its `\n`.
pub fn format_line(ts: &jiff::Timestamp, stream: &str, line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len() + 48);
    let mut chunks = line.chunks(MAX_LINE).peekable();
    if line.is_empty() {
        out.extend_from_slice(format!("{ts} {stream} F \n").as_bytes());
    }
    while let Some(chunk) = chunks.next() {
        let tag = if chunks.peek().is_some() { "P" } else { "F" };
        out.extend_from_slice(format!("{ts} {stream} {tag} ").as_bytes());
        out.extend_from_slice(chunk);
        out.push(b'\n');
    }
    out
}

/// Partial entries (`P`) for output that does not end its line yet, such as a terminal's
/// prompt; `line` holds no `\n`.
pub fn format_partial(ts: &jiff::Timestamp, stream: &str, line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len() + 48);
    for chunk in line.chunks(MAX_LINE) {
        out.extend_from_slice(format!("{ts} {stream} P ").as_bytes());
        out.extend_from_slice(chunk);
        out.push(b'\n');
    }
    out
}

/// One parsed entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    /// The time stamp as written.
    pub time: &'a str,
    /// `stdout` or `stderr`.
    pub stream: &'a str,
    /// Whether the line continues in the next entry.
    pub partial: bool,
    /// The content.
    pub content: &'a str,
}

/// Parses one entry (without its newline); `None` if it is not in the format.
pub fn parse_line(line: &str) -> Option<Entry<'_>> {
    let mut parts = line.splitn(4, ' ');
    let time = parts.next()?;
    let stream = parts.next()?;
    let tag = parts.next()?;
    let content = parts.next().unwrap_or("");
    if !matches!(stream, "stdout" | "stderr") || !matches!(tag, "F" | "P") {
        return None;
    }
    Some(Entry {
        time,
        stream,
        partial: tag == "P",
        content,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let ts: jiff::Timestamp = "2026-01-02T03:04:05.123456789Z".parse().expect("ts");
        let out = format_line(&ts, "stdout", b"hello world");
        let text = String::from_utf8(out).expect("utf8");
        assert_eq!(
            text,
            "2026-01-02T03:04:05.123456789Z stdout F hello world\n"
        );
        let e = parse_line(text.trim_end_matches('\n')).expect("parse");
        assert_eq!(e.content, "hello world");
        assert_eq!(e.stream, "stdout");
        assert!(!e.partial);
    }

    #[test]
    fn long_lines_are_split() {
        let ts = jiff::Timestamp::UNIX_EPOCH;
        let line = vec![b'x'; MAX_LINE + 5];
        let text = String::from_utf8(format_line(&ts, "stderr", &line)).expect("utf8");
        let entries: Vec<_> = text.lines().filter_map(parse_line).collect();
        assert_eq!(entries.len(), 2);
        assert!(entries[0].partial && !entries[1].partial);
        assert_eq!(entries[1].content.len(), 5);
    }
}
