//! The pure half of the RPC server: splitting the byte stream into JSON
//! values, validating requests and encoding responses, as SPDK does (notes
//! `spdk-rpc.md` §1.2–1.7). No I/O and no reactor, so all of it is unit
//! tested directly.
//!
//! Invariants: a value is handed out as soon as its last byte arrives; the
//! cost of framing stays linear in the input however fragmented it arrives
//! (no re-parse of a growing value on every read); at most
//! [`MAX_PENDING_BYTES`] of an incomplete value are buffered.

use std::fmt;

use bdev::rpc::{RpcError, INVALID_REQUEST, PARSE_ERROR};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// Largest incomplete value buffered per connection. Far above any real
/// request (rpc.py's largest are tens of KiB) while bounding the memory a
/// client that never finishes a value can pin. SPDK's own limit is 32 KiB.
pub const MAX_PENDING_BYTES: usize = 1 << 20;

/// Incomplete values up to this size are re-checked for syntax errors on
/// every read (cheap), so a hand-typed bad request is refused at once;
/// larger ones only each time they double, to keep the cost linear.
const EAGER_PROBE_BYTES: usize = 4096;

/// One top-level JSON value of the request stream, decoded only as deep as
/// request validation needs.
#[derive(Debug, PartialEq)]
pub enum Top {
    /// An object: its members in wire order, duplicates kept (SPDK's
    /// request decoder rejects them; serde_json's `Map` would hide them).
    Object(Vec<(String, Value)>),
    /// An array: a batch. Its elements are `Object` or `Other` (a nested
    /// array is not a request).
    Batch(Vec<Top>),
    /// Any other value: not a request.
    Other,
}

impl<'de> de::Deserialize<'de> for Top {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Top, D::Error> {
        TopSeed { in_batch: false }.deserialize(d)
    }
}

/// Decodes a [`Top`]; inside a batch, arrays are skipped as `Other`.
#[derive(Clone, Copy)]
struct TopSeed {
    in_batch: bool,
}

impl<'de> DeserializeSeed<'de> for TopSeed {
    type Value = Top;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Top, D::Error> {
        d.deserialize_any(self)
    }
}

/// Never fails on a syntactically valid value, so every error the parser
/// reports is a syntax error (or end of input).
impl<'de> Visitor<'de> for TopSeed {
    type Value = Top;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Top, E> {
        Ok(Top::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Top, E> {
        Ok(Top::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Top, E> {
        Ok(Top::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Top, E> {
        Ok(Top::Other)
    }

    fn visit_str<E>(self, _: &str) -> Result<Top, E> {
        Ok(Top::Other)
    }

    fn visit_unit<E>(self) -> Result<Top, E> {
        Ok(Top::Other)
    }

    fn visit_none<E>(self) -> Result<Top, E> {
        Ok(Top::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
        let mut members = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value::<Value>()?;
            members.push((key, value));
        }
        Ok(Top::Object(members))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Top, A::Error> {
        if self.in_batch {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(Top::Other);
        }
        let mut elements = Vec::new();
        while let Some(e) = seq.next_element_seed(TopSeed { in_batch: true })? {
            elements.push(e);
        }
        Ok(Top::Batch(elements))
    }
}

/// Why the stream cannot go on: the connection answers -32700 and closes
/// (there is no resync point in a stream of concatenated JSON values).
#[derive(Debug)]
pub enum FrameError {
    Syntax(serde_json::Error),
    /// An incomplete value grew past [`MAX_PENDING_BYTES`].
    TooLarge(usize),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Syntax(e) => write!(f, "invalid JSON: {e}"),
            FrameError::TooLarge(n) => write!(
                f,
                "incomplete request of {n} bytes exceeds the {MAX_PENDING_BYTES}-byte limit"
            ),
        }
    }
}

/// Where the bracket scan of the value at the head of the buffer stands.
/// Positions are absolute indices into `Framer::buf`.
#[derive(Debug, Default)]
struct Scan {
    /// Next byte to scan (0 = not started).
    pos: usize,
    /// Open `{`/`[` outside strings.
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Bytes pending at the last syntax probe of the incomplete value.
    probed: usize,
}

/// Splits a byte stream into top-level JSON values (SPDK's framing: values
/// simply concatenated, whitespace between them optional).
///
/// Objects, arrays and strings are delimited: a cheap incremental scan of
/// brackets and quotes finds where one may end, and only then serde_json
/// parses it (and is the judge of its validity). Until then, the incomplete
/// value is probed with serde_json now and then to refuse bad syntax
/// early. Other values go straight to serde_json, whose end-of-input error
/// means "need more bytes".
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// Start of the unconsumed bytes.
    start: usize,
    scan: Scan,
}

fn is_json_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Framer {
    pub fn new() -> Framer {
        Framer::default()
    }

    /// Appends bytes read from the connection.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scan.pos = self.scan.pos.saturating_sub(self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Whether unconsumed bytes other than whitespace remain: at end of
    /// input, a value that will never complete.
    pub fn has_partial(&self) -> bool {
        self.buf[self.start..]
            .iter()
            .any(|&b| !is_json_whitespace(b))
    }

    /// The next complete value, `None` if more bytes are needed.
    pub fn next_value(&mut self) -> Result<Option<Top>, FrameError> {
        while self.start < self.buf.len() && is_json_whitespace(self.buf[self.start]) {
            self.start += 1;
        }
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            self.scan = Scan::default();
            return Ok(None);
        }
        let delimited = matches!(self.buf[self.start], b'{' | b'[' | b'"');
        let end = if delimited {
            match self.scan_to_end() {
                Some(end) => end,
                None => return self.probe_incomplete(),
            }
        } else {
            self.buf.len()
        };
        let mut values =
            serde_json::Deserializer::from_slice(&self.buf[self.start..end]).into_iter::<Top>();
        match values.next() {
            Some(Ok(top)) => {
                self.start += values.byte_offset();
                self.scan = Scan::default();
                Ok(Some(top))
            }
            // The scan found a balanced end, so serde_json running out of
            // input there means the value is malformed, not unfinished.
            Some(Err(e)) if e.is_eof() && !delimited => self.incomplete(),
            Some(Err(e)) => Err(FrameError::Syntax(e)),
            None => self.incomplete(),
        }
    }

    fn incomplete(&self) -> Result<Option<Top>, FrameError> {
        let pending = self.buf.len() - self.start;
        if pending > MAX_PENDING_BYTES {
            return Err(FrameError::TooLarge(pending));
        }
        Ok(None)
    }

    /// For a delimited value not yet complete: a syntax error in what has
    /// arrived fails now rather than when the value closes (which it may
    /// never do).
    fn probe_incomplete(&mut self) -> Result<Option<Top>, FrameError> {
        self.incomplete()?;
        let pending = self.buf.len() - self.start;
        if pending <= EAGER_PROBE_BYTES || pending >= 2 * self.scan.probed {
            self.scan.probed = pending;
            let mut values = serde_json::Deserializer::from_slice(&self.buf[self.start..])
                .into_iter::<IgnoredAny>();
            if let Some(Err(e)) = values.next() {
                if !e.is_eof() {
                    return Err(FrameError::Syntax(e));
                }
            }
        }
        Ok(None)
    }

    /// Continues the scan of the delimited value starting at `start`;
    /// returns the index just past its end once seen.
    fn scan_to_end(&mut self) -> Option<usize> {
        let s = &mut self.scan;
        let from = s.pos.max(self.start);
        for (i, &b) in self.buf.iter().enumerate().skip(from) {
            if s.in_string {
                if s.escaped {
                    s.escaped = false;
                } else if b == b'\\' {
                    s.escaped = true;
                } else if b == b'"' {
                    s.in_string = false;
                    if s.depth == 0 {
                        return Some(i + 1);
                    }
                }
            } else {
                match b {
                    b'"' => s.in_string = true,
                    b'{' | b'[' => s.depth += 1,
                    b'}' | b']' => {
                        s.depth = s.depth.saturating_sub(1);
                        if s.depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
            }
        }
        s.pos = self.buf.len();
        None
    }
}

/// A valid request.
#[derive(Debug, PartialEq)]
pub struct Request {
    pub method: String,
    /// An object or array; JSON null is taken as absent, as SPDK does.
    pub params: Option<Value>,
    /// A string, number or null; absent or null makes a notification.
    pub id: Option<Value>,
}

impl Request {
    /// Successful notifications get no response (SPDK skips the response
    /// when the id is absent or null).
    pub fn is_notification(&self) -> bool {
        matches!(self.id, None | Some(Value::Null))
    }

    /// The id an answer carries: the request's own, or null.
    pub fn response_id(&self) -> &Value {
        self.id.as_ref().unwrap_or(&Value::Null)
    }
}

/// A request SPDK's `parse_single_request` rejects with -32600.
#[derive(Debug, PartialEq)]
pub struct Invalid {
    /// The id the error response carries: null unless the id was already
    /// accepted when the fault was found (only a bad `params` type).
    pub id: Value,
    pub reason: &'static str,
}

/// Validates one request object as SPDK does (§1.3): the decoder is strict
/// (only `jsonrpc`, `method`, `params`, `id`; no duplicates; `method`
/// required), then `jsonrpc` must be "2.0" if present, `method` a string,
/// `id` a string, number or null, and `params` an object, array or null.
pub fn validate(members: Vec<(String, Value)>) -> Result<Request, Invalid> {
    let invalid = |reason| Invalid {
        id: Value::Null,
        reason,
    };
    let (mut version, mut method, mut params, mut id) = (None, None, None, None);
    for (key, value) in members {
        let slot = match key.as_str() {
            "jsonrpc" => &mut version,
            "method" => &mut method,
            "params" => &mut params,
            "id" => &mut id,
            _ => return Err(invalid("unknown member")),
        };
        if slot.replace(value).is_some() {
            return Err(invalid("duplicate member"));
        }
    }
    match version {
        None => {}
        Some(Value::String(v)) if v == "2.0" => {}
        Some(_) => return Err(invalid("jsonrpc is not \"2.0\"")),
    }
    let method = match method {
        Some(Value::String(m)) => m,
        Some(_) => return Err(invalid("method is not a string")),
        None => return Err(invalid("no method")),
    };
    let id = match id {
        None => None,
        Some(v @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(v),
        Some(_) => return Err(invalid("id is not a string, number or null")),
    };
    let params = match params {
        None | Some(Value::Null) => None,
        Some(v @ (Value::Object(_) | Value::Array(_))) => Some(v),
        Some(_) => {
            return Err(Invalid {
                id: id.unwrap_or(Value::Null),
                reason: "params is not an object or array",
            })
        }
    };
    Ok(Request { method, params, id })
}

/// `{"jsonrpc":"2.0","id":<id>,"result":<result>}`, compact, in SPDK's key
/// order (built by hand: serde_json's `Map` would sort the keys).
pub fn encode_result(id: &Value, result: &Value) -> String {
    format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#)
}

/// `{"jsonrpc":"2.0","id":<id>,"error":{"code":<code>,"message":<message>}}`.
pub fn encode_error(id: &Value, err: &RpcError) -> String {
    let message = Value::from(err.message.as_str());
    format!(
        r#"{{"jsonrpc":"2.0","id":{id},"error":{{"code":{},"message":{message}}}}}"#,
        err.code
    )
}

/// The -32600 response SPDK sends for an invalid request.
pub fn encode_invalid(id: &Value) -> String {
    encode_error(id, &RpcError::new(INVALID_REQUEST, "Invalid request"))
}

/// The response sent before closing a connection whose stream cannot be
/// parsed, newline included.
pub fn parse_error_line() -> String {
    let mut s = encode_error(&Value::Null, &RpcError::new(PARSE_ERROR, "Parse error"));
    s.push('\n');
    s
}

/// The batch response: responses joined as `[a,b]` plus newline, or `None`
/// when there are none (every element was a successful notification).
pub fn encode_batch(responses: &[String]) -> Option<String> {
    if responses.is_empty() {
        return None;
    }
    Some(format!("[{}]\n", responses.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn members(v: Value) -> Vec<(String, Value)> {
        match v {
            Value::Object(m) => m.into_iter().collect(),
            _ => panic!("not an object"),
        }
    }

    /// An object with members in wire order.
    fn obj(members: &[(&str, Value)]) -> Top {
        Top::Object(
            members
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    /// Feeds `chunks` one at a time, collecting every value.
    fn split(chunks: &[&[u8]]) -> Result<Vec<Top>, FrameError> {
        let mut f = Framer::new();
        let mut out = Vec::new();
        for c in chunks {
            f.push(c);
            while let Some(v) = f.next_value()? {
                out.push(v);
            }
        }
        Ok(out)
    }

    const PRETTY: &str =
        "{\n  \"jsonrpc\": \"2.0\",\n  \"method\": \"bdev_get_bdevs\",\n  \"id\": 1\n}";

    #[test]
    fn pretty_printed_request_in_fragments() {
        let expected = || {
            obj(&[
                ("jsonrpc", json!("2.0")),
                ("method", json!("bdev_get_bdevs")),
                ("id", json!(1)),
            ])
        };
        for cut in 0..=PRETTY.len() {
            let (a, b) = PRETTY.as_bytes().split_at(cut);
            assert_eq!(split(&[a, b]).unwrap(), vec![expected()], "cut {cut}");
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = PRETTY.as_bytes().chunks(1).collect();
        assert_eq!(split(&bytes).unwrap(), vec![expected()]);
    }

    #[test]
    fn several_values_in_one_buffer_with_or_without_whitespace() {
        let input = br#"{"method":"a","id":1}{"method":"b","id":2}
  	{"method":"c"}  [] "s" 7 true null
"#;
        let got = split(&[input]).unwrap();
        assert_eq!(
            got,
            vec![
                obj(&[("method", json!("a")), ("id", json!(1))]),
                obj(&[("method", json!("b")), ("id", json!(2))]),
                obj(&[("method", json!("c"))]),
                Top::Batch(vec![]),
                Top::Other,
                Top::Other,
                Top::Other,
                Top::Other,
            ]
        );
    }

    #[test]
    fn brackets_and_quotes_inside_strings_do_not_end_a_value() {
        let input = br#"{"method":"x}]\"{[","params":{"a":"\\"}}"#;
        let (a, b) = input.split_at(12);
        let got = split(&[a, b]).unwrap();
        assert_eq!(
            got,
            vec![obj(&[
                ("method", json!("x}]\"{[")),
                ("params", json!({"a": "\\"})),
            ])]
        );
    }

    #[test]
    fn batch_elements_are_objects_or_other() {
        let got = split(&[br#"[{"method":"a"}, 1, [{"method":"b"}], "x"]"#]).unwrap();
        assert_eq!(
            got,
            vec![Top::Batch(vec![
                obj(&[("method", json!("a"))]),
                Top::Other,
                Top::Other,
                Top::Other,
            ])]
        );
    }

    #[test]
    fn duplicate_members_are_kept() {
        let got = split(&[br#"{"id":1,"id":2}"#]).unwrap();
        assert_eq!(
            got,
            vec![Top::Object(vec![
                ("id".into(), json!(1)),
                ("id".into(), json!(2))
            ])]
        );
    }

    #[test]
    fn incomplete_input_waits_and_whitespace_is_not_partial() {
        let mut f = Framer::new();
        f.push(b"  \n ");
        assert!(f.next_value().unwrap().is_none());
        assert!(!f.has_partial());
        f.push(b"{\"method\": [1, {");
        assert!(f.next_value().unwrap().is_none());
        assert!(f.has_partial());
        f.push(b"}]}\n");
        assert_eq!(
            f.next_value().unwrap(),
            Some(obj(&[("method", json!([1, {}]))]))
        );
        assert!(f.next_value().unwrap().is_none());
        assert!(!f.has_partial());
        // An unfinished literal also waits.
        f.push(b"tr");
        assert!(f.next_value().unwrap().is_none());
        f.push(b"ue ");
        assert_eq!(f.next_value().unwrap(), Some(Top::Other));
    }

    #[test]
    fn invalid_json_is_a_syntax_error() {
        for bad in [
            &b"{\"method\" \"x\"}"[..],
            b"{\"method\":\"x\",}",
            b"{\"a\":1}}",
            b"[1,]",
            b"]",
            b"{\"a\":1]",
            b"nul!",
            b"{\"a\":\"\x01\"}",
            b"{\"method\":\"x\"} // comment",
        ] {
            match split(&[bad]) {
                Err(FrameError::Syntax(_)) => {}
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bad)),
            }
        }
        // Values before the error are still delivered first.
        let mut f = Framer::new();
        f.push(b"{\"method\":\"a\"} x");
        assert!(f.next_value().unwrap().is_some());
        assert!(matches!(f.next_value(), Err(FrameError::Syntax(_))));
    }

    #[test]
    fn bad_syntax_is_refused_before_the_value_closes() {
        let mut f = Framer::new();
        f.push(b"{\"method\":\"echo\",");
        assert!(f.next_value().unwrap().is_none());
        f.push(b" bad json");
        assert!(matches!(f.next_value(), Err(FrameError::Syntax(_))));
        // In a large value, by the time it has doubled.
        let mut f = Framer::new();
        let mut big = b"[\"".to_vec();
        big.resize(100_000, b'a');
        f.push(&big);
        assert!(f.next_value().unwrap().is_none());
        f.push(b"\", x");
        let mut refused = false;
        for _ in 0..200 {
            match f.next_value() {
                Ok(None) => f.push(&[b' '; 1000]),
                Ok(Some(v)) => panic!("unexpected value {v:?}"),
                Err(e) => {
                    assert!(matches!(e, FrameError::Syntax(_)), "{e}");
                    refused = true;
                    break;
                }
            }
        }
        assert!(refused);
    }

    #[test]
    fn incomplete_value_over_the_limit_is_refused() {
        let mut f = Framer::new();
        f.push(b"{\"method\":\"x\",\"params\":{\"pad\":\"");
        let chunk = vec![b'a'; 64 * 1024];
        let mut pushed = 0;
        let err = loop {
            match f.next_value() {
                Ok(None) => {}
                Ok(Some(v)) => panic!("unexpected value {v:?}"),
                Err(e) => break e,
            }
            f.push(&chunk);
            pushed += chunk.len();
            assert!(pushed < 2 * MAX_PENDING_BYTES, "never refused");
        };
        assert!(matches!(err, FrameError::TooLarge(n) if n > MAX_PENDING_BYTES));
        // Just under the limit is fine.
        let mut f = Framer::new();
        let mut big = b"{\"method\":\"x\",\"params\":[\"".to_vec();
        big.resize(MAX_PENDING_BYTES - 10, b'a');
        f.push(&big);
        assert!(f.next_value().unwrap().is_none());
        f.push(b"\"]}");
        assert!(matches!(f.next_value(), Ok(Some(Top::Object(_)))));
    }

    #[test]
    fn valid_requests() {
        let r = validate(members(
            json!({"jsonrpc": "2.0", "method": "m", "params": {"a": 1}, "id": "x"}),
        ))
        .unwrap();
        assert_eq!(r.method, "m");
        assert_eq!(r.params, Some(json!({"a": 1})));
        assert_eq!(r.id, Some(json!("x")));
        assert!(!r.is_notification());
        // No jsonrpc member, params array, numeric id.
        let r = validate(members(json!({"method": "m", "params": [1], "id": 7}))).unwrap();
        assert_eq!(r.params, Some(json!([1])));
        assert_eq!(r.response_id(), &json!(7));
        // Null params are absent; null id is a notification.
        let r = validate(members(json!({"method": "m", "params": null, "id": null}))).unwrap();
        assert_eq!(r.params, None);
        assert!(r.is_notification());
        assert_eq!(r.response_id(), &Value::Null);
        let r = validate(members(json!({"method": "m"}))).unwrap();
        assert!(r.is_notification());
    }

    #[test]
    fn each_invalid_request_case() {
        let null_id = [
            ("unknown member", json!({"method": "m", "id": 1, "foo": 1})),
            ("no method", json!({"jsonrpc": "2.0", "id": 1})),
            ("method not a string", json!({"method": 5, "id": 1})),
            (
                "bad version",
                json!({"jsonrpc": "1.0", "method": "m", "id": 1}),
            ),
            (
                "version not a string",
                json!({"jsonrpc": 2, "method": "m", "id": 1}),
            ),
            ("id is an object", json!({"method": "m", "id": {}})),
            ("id is an array", json!({"method": "m", "id": [1]})),
            ("id is a bool", json!({"method": "m", "id": true})),
        ];
        for (what, req) in null_id {
            let e = validate(members(req)).unwrap_err();
            assert_eq!(e.id, Value::Null, "{what}");
        }
        let dup = vec![
            ("method".to_string(), json!("m")),
            ("id".to_string(), json!(1)),
            ("id".to_string(), json!(2)),
        ];
        assert_eq!(validate(dup).unwrap_err().id, Value::Null);
        // A bad params type is found after the id was accepted: SPDK echoes it.
        for params in [json!(1), json!("x"), json!(true)] {
            let e =
                validate(members(json!({"method": "m", "id": 9, "params": params}))).unwrap_err();
            assert_eq!(e.id, json!(9));
        }
    }

    #[test]
    fn response_encoding() {
        assert_eq!(
            encode_result(&json!(1), &json!({"a": "x", "b": [1, 2]})),
            r#"{"jsonrpc":"2.0","id":1,"result":{"a":"x","b":[1,2]}}"#
        );
        assert_eq!(
            encode_result(&json!("req-\"7\""), &json!(true)),
            r#"{"jsonrpc":"2.0","id":"req-\"7\"","result":true}"#
        );
        assert_eq!(
            encode_result(&json!(1.5), &Value::Null),
            r#"{"jsonrpc":"2.0","id":1.5,"result":null}"#
        );
        assert_eq!(
            encode_error(&json!(3), &RpcError::new(-19, "No such device")),
            r#"{"jsonrpc":"2.0","id":3,"error":{"code":-19,"message":"No such device"}}"#
        );
        assert_eq!(
            encode_invalid(&Value::Null),
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Invalid request"}}"#
        );
        assert_eq!(
            parse_error_line(),
            "{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":-32700,\"message\":\"Parse error\"}}\n"
        );
        // Every encoding is one valid JSON value with no newline inside.
        let e = encode_error(&json!("i"), &RpcError::new(-22, "line\nbreak \u{e9}"));
        assert!(!e.contains('\n'));
        let v: Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["error"]["message"], "line\nbreak \u{e9}");
    }

    #[test]
    fn batch_encoding() {
        assert_eq!(encode_batch(&[]), None);
        assert_eq!(
            encode_batch(&[
                encode_result(&json!(1), &json!(1)),
                encode_invalid(&Value::Null)
            ])
            .unwrap(),
            "[{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":1},{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":-32600,\"message\":\"Invalid request\"}}]\n"
        );
    }
}
