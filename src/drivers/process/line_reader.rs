//! A line reader whose memory is bounded by the longest line it accepts, not by its input.

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// What [`LineReader::next_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReadLine {
    /// A whole line, now in [`LineReader::line`] (without its `\n`).
    Complete,
    /// A line of `len` bytes, more than the limit: only its first `max` bytes were kept.
    Oversized { len: usize },
    /// The stream ended; a final line without `\n` was returned before this.
    Eof,
}

/// Reads `\n`-terminated lines while holding at most `max` bytes of any one of them.
///
/// tokio's `read_until` and `lines` grow their buffer until a newline arrives, so a driver that
/// writes a gigabyte without a newline would take the agent's memory with it. This reader keeps
/// a line's first `max` bytes, skips the rest as it streams past, and reports the full length so
/// the caller can tell an oversized line from a complete one.
///
/// It is cancel safe, so it can lose a `select!` race without losing bytes: the only await is
/// `fill_buf`, which consumes nothing, and all progress through a line lives in `self`.
pub(super) struct LineReader<R> {
    reader: R,
    max: usize,
    /// The first `max` bytes of the current line.
    line: Vec<u8>,
    /// Bytes of the current line seen so far, kept or not.
    len: usize,
    /// The last call returned a line: the next one starts afresh.
    returned: bool,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    pub(super) fn new(reader: R, max: usize) -> Self {
        LineReader {
            reader,
            max,
            line: Vec::new(),
            len: 0,
            returned: false,
        }
    }

    /// Reads up to the end of the next line. Its kept bytes are then in [`LineReader::line`].
    pub(super) async fn next_line(&mut self) -> io::Result<ReadLine> {
        if self.returned {
            self.line.clear();
            self.len = 0;
            self.returned = false;
        }
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                if self.len == 0 {
                    return Ok(ReadLine::Eof);
                }
                // The stream ended mid-line: the partial line is still a line.
                return Ok(self.finish_line());
            }
            let newline = available.iter().position(|&b| b == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            let keep = chunk.len().min(self.max - self.line.len());
            // reserve_exact, so the buffer's capacity never exceeds `max`.
            self.line.reserve_exact(keep);
            self.line.extend_from_slice(&chunk[..keep]);
            self.len += chunk.len();
            let consumed = chunk.len() + usize::from(newline.is_some());
            self.reader.consume(consumed);
            if newline.is_some() {
                return Ok(self.finish_line());
            }
        }
    }

    fn finish_line(&mut self) -> ReadLine {
        self.returned = true;
        if self.len > self.max {
            ReadLine::Oversized { len: self.len }
        } else {
            ReadLine::Complete
        }
    }

    /// The kept bytes of the line last returned.
    pub(super) fn line(&self) -> &[u8] {
        &self.line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncWriteExt, BufReader};
    use tokio::time::timeout;

    async fn read_all(input: &[u8], max: usize) -> Vec<(ReadLine, Vec<u8>)> {
        let mut reader = LineReader::new(input, max);
        let mut out = Vec::new();
        loop {
            let read = reader.next_line().await.unwrap();
            if read == ReadLine::Eof {
                return out;
            }
            out.push((read, reader.line().to_vec()));
        }
    }

    #[tokio::test]
    async fn lines_are_split_on_newlines_and_a_final_partial_line_counts() {
        let lines = read_all(b"one\n\ntwo\nthree", 16).await;
        assert_eq!(
            lines,
            vec![
                (ReadLine::Complete, b"one".to_vec()),
                (ReadLine::Complete, b"".to_vec()),
                (ReadLine::Complete, b"two".to_vec()),
                (ReadLine::Complete, b"three".to_vec()),
            ]
        );
    }

    #[tokio::test]
    async fn an_oversized_line_is_reported_and_the_next_line_is_intact() {
        let mut input = vec![b'x'; 5000];
        input.extend_from_slice(b"\nafter\n");
        // A tiny BufReader makes the long line arrive in many pieces.
        let mut reader = LineReader::new(BufReader::with_capacity(64, &input[..]), 1024);
        assert_eq!(
            reader.next_line().await.unwrap(),
            ReadLine::Oversized { len: 5000 }
        );
        assert_eq!(reader.line(), &[b'x'; 1024][..]);
        assert!(reader.line.capacity() <= 1024, "buffer grew past the cap");
        assert_eq!(reader.next_line().await.unwrap(), ReadLine::Complete);
        assert_eq!(reader.line(), b"after");
        assert_eq!(reader.next_line().await.unwrap(), ReadLine::Eof);
    }

    #[tokio::test]
    async fn a_line_of_exactly_the_limit_is_complete() {
        let lines = read_all(b"abcd\nabcde\n", 4).await;
        assert_eq!(lines[0], (ReadLine::Complete, b"abcd".to_vec()));
        assert_eq!(lines[1], (ReadLine::Oversized { len: 5 }, b"abcd".to_vec()));
    }
    #[tokio::test]
    async fn the_reader_survives_cancellation_mid_line() {
        // A duplex pipe delivers the line in two writes; the first read is cancelled in between.
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut reader = LineReader::new(BufReader::new(rx), 64);
        tx.write_all(b"hel").await.unwrap();
        let cancelled = timeout(Duration::from_millis(50), reader.next_line()).await;
        assert!(cancelled.is_err(), "returned before the newline");
        tx.write_all(b"lo\n").await.unwrap();
        assert_eq!(reader.next_line().await.unwrap(), ReadLine::Complete);
        assert_eq!(reader.line(), b"hello");
    }
}
