//! W3C Trace Context (`traceparent`): parsing and deriving the header that
//! follows one instance's work across processes (HTTP request → Postgres →
//! RabbitMQ message headers → worker → the HTTP calls of its steps). Plain
//! string work; the caller supplies any randomness.

/// A valid `traceparent`: version 00, a trace id and a parent (span) id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: String,
    /// 16 lowercase hex digits, not all zero.
    pub parent_id: String,
    /// 2 hex digits (`01`: sampled).
    pub flags: String,
}

fn hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
        && text.bytes().any(|byte| byte != b'0')
}

impl TraceParent {
    /// Parses a `traceparent` header; None when it is not valid (the W3C
    /// rule: an invalid header is ignored and a new trace starts).
    pub fn parse(header: &str) -> Option<TraceParent> {
        let mut parts = header.trim().split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || version != "00" {
            return None;
        }
        let flags_ok = flags.len() == 2 && flags.bytes().all(|byte| byte.is_ascii_hexdigit());
        (hex(trace_id, 32) && hex(parent_id, 16) && flags_ok).then(|| TraceParent {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags: flags.to_ascii_lowercase(),
        })
    }

    /// A new sampled trace from 16 random bytes (trace id) and 8 (span id).
    pub fn root(trace_bytes: [u8; 16], span_bytes: [u8; 8]) -> TraceParent {
        TraceParent {
            trace_id: to_hex(&trace_bytes),
            parent_id: to_hex(&span_bytes),
            flags: "01".to_owned(),
        }
    }

    /// The same trace with `span_bytes` as the parent span (a hop of it).
    pub fn child(&self, span_bytes: [u8; 8]) -> TraceParent {
        TraceParent {
            trace_id: self.trace_id.clone(),
            parent_id: to_hex(&span_bytes),
            flags: self.flags.clone(),
        }
    }

    /// The header value.
    pub fn header(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.parent_id, self.flags)
    }
}

/// Lowercase hex of `bytes`, written into one allocation (the dispatcher
/// derives a header per message, so no `format!` per byte).
fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    // An all-zero id is invalid; the odds are nil, but keep the header valid.
    if text.bytes().all(|byte| byte == b'0') {
        text.replace_range(text.len() - 1.., "1");
    }
    text
}

/// The span id of a hop, from the last 8 bytes of an id (a task run's
/// UUIDv7: its random part).
pub fn span_bytes(id: &[u8; 16]) -> [u8; 8] {
    let mut span = [0u8; 8];
    span.copy_from_slice(&id[8..16]);
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_w3c_example_and_rejects_invalid_headers() {
        let parsed =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(parsed.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.parent_id, "00f067aa0ba902b7");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_child_keeps_the_trace_and_changes_the_span() {
        let root = TraceParent::root([7; 16], [1; 8]);
        let child = root.child(span_bytes(&[9; 16]));
        assert_eq!(child.trace_id, root.trace_id);
        assert_eq!(child.parent_id, "0909090909090909");
        assert_eq!(TraceParent::parse(&child.header()).as_ref(), Some(&child));
    }

    #[test]
    fn ids_are_lowercase_hex_of_every_byte_and_never_all_zero() {
        let root = TraceParent::root(
            [
                0x00, 0x01, 0x0f, 0x10, 0x7f, 0x80, 0xab, 0xff, 0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3,
                0x4d, 0xa6,
            ],
            [0; 8],
        );
        assert_eq!(root.trace_id, "00010f107f80abff4bf92f3577b34da6");
        assert_eq!(root.parent_id, "0000000000000001");
        assert_eq!(
            root.header(),
            "00-00010f107f80abff4bf92f3577b34da6-0000000000000001-01"
        );
        assert!(TraceParent::parse(&root.header()).is_some());
    }
}
