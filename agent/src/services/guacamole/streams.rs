//! Which file streams are open on one tunnel, read from the instructions the relay passes both
//! ways: the streams the HTTP stream endpoints (`docs/guacamole.md`, "File transfer over HTTP
//! streams", issue 20) may take over. Only bookkeeping: nothing here sends or blocks.
//!
//! guacd and the browser number their streams independently (a `body` from guacd and a `file`
//! from the browser may both use index 3), so the table keeps the two directions apart.

use std::collections::HashMap;

use super::protocol::Frame;
use super::rename::Opened;

/// Open streams tracked per direction at most. guacd allows 64 streams per user
/// (`GUAC_USER_MAX_STREAMS`); a browser opening more gets them relayed as before, only not
/// offered to the HTTP endpoints.
pub const MAX_TRACKED: usize = 64;

/// The longest download path kept (bytes): guacd's `GUAC_COMMON_SSH_SFTP_MAX_PATH`; guacd
/// refuses longer names, so a longer one is not a file it opened.
pub const MAX_PATH_KEPT: usize = 2048;

/// A stream guacd sends: a file the browser may download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// The type guacd announced (`application/octet-stream` for files).
    pub mimetype: String,
    /// The filesystem object's stream name it answers (`body`'s `<name>`, what the page's
    /// `get` asked for); `None` for a download guacd started itself with `file` (only a base
    /// name) or a name longer than [`MAX_PATH_KEPT`].
    pub path: Option<String>,
}

/// A stream the browser sends: a file being uploaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// guacd acked the `file`/`put` with success: it has the file open and takes blobs.
    pub accepted: bool,
    /// The name the page opened it with (what guacd writes to).
    pub opened: Opened,
}

/// The file streams open on one tunnel.
#[derive(Debug, Default)]
pub struct StreamTable {
    downloads: HashMap<u32, Download>,
    uploads: HashMap<u32, Upload>,
}

impl StreamTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes an instruction guacd sent to the browser.
    pub fn from_guacd(&mut self, frame: &Frame<'_>) {
        match frame.opcode() {
            // body,<object>,<stream>,<mimetype>,<name> answers a `get`; file,<stream>,
            // <mimetype>,<filename> is a download guacd starts itself.
            "body" => self.open_download(frame.arg(1), frame.arg(2), frame.arg(3)),
            "file" => self.open_download(frame.arg(0), frame.arg(1), None),
            "end" => {
                if let Some(index) = index(frame.arg(0)) {
                    self.downloads.remove(&index);
                }
            }
            // ack,<stream>,<message>,<status> for a stream the browser sends.
            "ack" => {
                let Some(index) = index(frame.arg(0)) else {
                    return;
                };
                if frame.arg(2) == Some("0") {
                    if let Some(upload) = self.uploads.get_mut(&index) {
                        upload.accepted = true;
                    }
                } else {
                    // An error ack ends the stream (guacd frees it).
                    self.uploads.remove(&index);
                }
            }
            _ => {}
        }
    }

    /// Notes an instruction the browser sent to guacd.
    pub fn from_browser(&mut self, frame: &Frame<'_>) {
        match frame.opcode() {
            // file,<stream>,<mimetype>,<filename>; put,<object>,<stream>,<mimetype>,<name>.
            "file" => self.open_upload(
                frame.arg(0),
                Opened::File(frame.arg(2).unwrap_or("").to_owned()),
            ),
            "put" => self.open_upload(
                frame.arg(1),
                Opened::Put(frame.arg(3).unwrap_or("").to_owned()),
            ),
            "end" => {
                if let Some(index) = index(frame.arg(0)) {
                    self.uploads.remove(&index);
                }
            }
            "ack" => {
                // An error ack from the browser ends guacd's stream (guacd frees it without
                // `end`).
                if let Some(index) = index(frame.arg(0)) {
                    if frame.arg(2) != Some("0") {
                        self.downloads.remove(&index);
                    }
                }
            }
            _ => {}
        }
    }

    /// The download open at `index`, if any.
    pub fn download(&self, index: u32) -> Option<&Download> {
        self.downloads.get(&index)
    }

    /// The upload open at `index`, if any.
    pub fn upload(&self, index: u32) -> Option<&Upload> {
        self.uploads.get(&index)
    }

    /// Upload `index` was ended by the web side (the page's `end` will not pass).
    pub fn end_upload(&mut self, index: u32) {
        self.uploads.remove(&index);
    }

    fn open_download(&mut self, stream: Option<&str>, mimetype: Option<&str>, path: Option<&str>) {
        let mimetype = mimetype.unwrap_or("application/octet-stream").to_owned();
        let path = path
            .filter(|p| !p.is_empty() && p.len() < MAX_PATH_KEPT)
            .map(str::to_owned);
        open(&mut self.downloads, stream, Download { mimetype, path });
    }

    fn open_upload(&mut self, stream: Option<&str>, opened: Opened) {
        // A reused index is a new stream: not accepted until guacd acks it again.
        open(
            &mut self.uploads,
            stream,
            Upload {
                accepted: false,
                opened,
            },
        );
    }
}

/// Notes stream `stream` as open in `table` with `value`, unless the table is full.
fn open<T>(table: &mut HashMap<u32, T>, stream: Option<&str>, value: T) {
    let Some(index) = index(stream) else {
        return;
    };
    if table.len() >= MAX_TRACKED && !table.contains_key(&index) {
        return;
    }
    table.insert(index, value);
}

/// A stream index as the protocol writes it (a decimal integer); anything else is not one.
pub(super) fn index(value: Option<&str>) -> Option<u32> {
    let value = value?;
    if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::guacamole::protocol::Decoder;

    /// Feeds `wire` (instructions as sent) to the table, as from guacd or from the browser.
    fn feed(table: &mut StreamTable, from_guacd: bool, wire: &str) {
        let mut decoder = Decoder::new();
        decoder.push(wire.as_bytes());
        while let Some(frame) = decoder.next_frame() {
            let frame = frame.unwrap();
            if from_guacd {
                table.from_guacd(&frame);
            } else {
                table.from_browser(&frame);
            }
        }
    }

    #[test]
    fn a_download_is_open_from_body_to_end() {
        let mut t = StreamTable::new();
        assert!(t.download(3).is_none());
        feed(&mut t, true, "4.body,1.0,1.3,24.application/octet-stream,8./tmp/a.b;");
        assert_eq!(t.download(3).unwrap().mimetype, "application/octet-stream");
        // The path the page's `get` asked for is kept: the web side checks the size by it.
        assert_eq!(t.download(3).unwrap().path.as_deref(), Some("/tmp/a.b"));
        // The browser's acks and guacd's blobs keep it open.
        feed(&mut t, false, "3.ack,1.3,2.OK,1.0;");
        feed(&mut t, true, "4.blob,1.3,4.AAAA;");
        assert!(t.download(3).is_some());
        feed(&mut t, true, "3.end,1.3;");
        assert!(t.download(3).is_none());
    }

    #[test]
    fn a_download_guacd_starts_with_file_is_open_too() {
        let mut t = StreamTable::new();
        feed(&mut t, true, "4.file,1.5,10.text/plain,5.a.txt;");
        assert_eq!(t.download(5).unwrap().mimetype, "text/plain");
        // `file` names the file, not where it is: no path.
        assert_eq!(t.download(5).unwrap().path, None);
    }

    #[test]
    fn a_download_path_is_bounded() {
        let mut t = StreamTable::new();
        let long = format!("/{}", "x".repeat(MAX_PATH_KEPT));
        feed(&mut t, true, &format!("4.body,1.0,1.3,24.application/octet-stream,{}.{long};", long.len()));
        assert!(t.download(3).is_some());
        assert_eq!(t.download(3).unwrap().path, None);
        feed(&mut t, true, "4.body,1.0,1.4,24.application/octet-stream,0.;");
        assert_eq!(t.download(4).unwrap().path, None);
    }

    #[test]
    fn an_error_ack_from_the_browser_ends_a_download() {
        let mut t = StreamTable::new();
        feed(&mut t, true, "4.body,1.0,1.3,24.application/octet-stream,2./a;");
        feed(&mut t, false, "3.ack,1.3,9.Cancelled,3.776;");
        assert!(t.download(3).is_none());
    }

    #[test]
    fn an_upload_is_accepted_once_guacd_acks_it_and_ends_with_end() {
        let mut t = StreamTable::new();
        feed(&mut t, false, "4.file,1.2,24.application/octet-stream,5.a.bin;");
        let opened = Opened::File("a.bin".into());
        assert_eq!(t.upload(2), Some(&Upload { accepted: false, opened: opened.clone() }));
        feed(&mut t, true, "3.ack,1.2,17.SFTP: File opened,1.0;");
        assert_eq!(t.upload(2), Some(&Upload { accepted: true, opened }));
        feed(&mut t, false, "3.end,1.2;");
        assert_eq!(t.upload(2), None);
    }

    #[test]
    fn a_put_opens_an_upload_and_an_error_ack_refuses_it() {
        let mut t = StreamTable::new();
        feed(&mut t, false, "3.put,1.0,1.4,10.text/plain,6./a/b.c;");
        let opened = Opened::Put("/a/b.c".into());
        assert_eq!(t.upload(4), Some(&Upload { accepted: false, opened }));
        feed(&mut t, true, "3.ack,1.4,17.SFTP: Open failed,3.769;");
        assert_eq!(t.upload(4), None);
    }

    #[test]
    fn the_two_directions_number_streams_apart() {
        let mut t = StreamTable::new();
        feed(&mut t, true, "4.body,1.0,1.1,24.application/octet-stream,2./a;");
        feed(&mut t, false, "4.file,1.1,24.application/octet-stream,1.b;");
        // guacd's end of its stream 1 leaves the browser's stream 1 open, and the reverse.
        feed(&mut t, true, "3.end,1.1;");
        assert!(t.download(1).is_none());
        assert!(t.upload(1).is_some());
        feed(&mut t, true, "4.body,1.0,1.1,24.application/octet-stream,2./a;");
        feed(&mut t, false, "3.end,1.1;");
        assert!(t.download(1).is_some());
        assert!(t.upload(1).is_none());
    }

    #[test]
    fn the_table_is_bounded_and_ignores_what_is_not_an_index() {
        let mut t = StreamTable::new();
        let mut wire = String::new();
        for i in 0..(MAX_TRACKED as u32 + 10) {
            let n = i.to_string();
            wire.push_str(&format!("4.file,{}.{n},10.text/plain,1.x;", n.len()));
        }
        feed(&mut t, false, &wire);
        assert_eq!(t.uploads.len(), MAX_TRACKED);
        assert!(t.upload(MAX_TRACKED as u32).is_none());
        for bad in ["-1", "", "1e3", "99999999999", "+4"] {
            assert_eq!(index(Some(bad)), None, "{bad:?}");
        }
        feed(&mut t, true, "4.body,1.0,2.-1,10.text/plain,1.x;");
        assert!(t.downloads.is_empty());
    }
}
