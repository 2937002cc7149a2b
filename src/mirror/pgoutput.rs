//! The messages of Postgres's `pgoutput` logical decoding plugin, protocol
//! version 1, as the replication stream carries them (one `XLogData` each):
//! one message per row. Only what the mirror needs is kept.
//!
//! <https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html>

use std::fmt;

/// One column of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value that did not change: not sent.
    Unchanged,
    Text(String),
}

/// A row image: one value per column of its relation.
pub type Tuple = Vec<Value>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        /// The transaction's commit LSN.
        final_lsn: u64,
        /// Microseconds since 2000-01-01 UTC.
        commit_time: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: u64,
        /// The end of the commit record: what a consumer confirms.
        end_lsn: u64,
        commit_time: i64,
    },
    Relation {
        oid: u32,
        namespace: String,
        name: String,
        columns: Vec<Column>,
    },
    Insert {
        relation: u32,
        new: Tuple,
    },
    Update {
        relation: u32,
        /// The old key (or whole old row, with REPLICA IDENTITY FULL) when the
        /// key changed or the identity is full.
        old: Option<Tuple>,
        new: Tuple,
    },
    Delete {
        relation: u32,
        /// The key columns (others null), or the whole row with FULL.
        old: Tuple,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Origin, type, logical messages: nothing the mirror uses.
    Other(u8),
}

/// A message that does not parse: the feed is not what this build expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unreadable pgoutput message: {}", self.0)
    }
}

impl std::error::Error for ParseError {}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ParseError> {
        if self.buf.len() < n {
            return Err(ParseError(format!(
                "{n} bytes wanted, {} left",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, ParseError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, ParseError> {
        Ok(i16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn i32(&mut self) -> Result<i32, ParseError> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, ParseError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, ParseError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn i64(&mut self) -> Result<i64, ParseError> {
        Ok(i64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn string(&mut self) -> Result<String, ParseError> {
        let end = self
            .buf
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| ParseError("unterminated string".into()))?;
        let s = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Tuple, ParseError> {
        let n = self.i16()?;
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.i32()?;
                    let len = usize::try_from(len)
                        .map_err(|_| ParseError(format!("negative length {len}")))?;
                    Value::Text(String::from_utf8_lossy(self.take(len)?).into_owned())
                }
                other => return Err(ParseError(format!("tuple column kind {other:#x}"))),
            });
        }
        Ok(out)
    }
}

impl Reader<'_> {
    /// A Relation message, after its tag.
    fn relation(&mut self) -> Result<Message, ParseError> {
        let oid = self.u32()?;
        let namespace = self.string()?;
        let name = self.string()?;
        let _replica_identity = self.u8()?;
        let n = self.i16()?;
        let mut columns = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            let _flags = self.u8()?;
            let name = self.string()?;
            let type_oid = self.u32()?;
            let _typmod = self.i32()?;
            columns.push(Column { name, type_oid });
        }
        Ok(Message::Relation {
            oid,
            namespace,
            name,
            columns,
        })
    }

    /// An Update message, after its tag: the old key or row if sent, then
    /// the new row.
    fn update(&mut self) -> Result<Message, ParseError> {
        let relation = self.u32()?;
        let mut old = None;
        let mut kind = self.u8()?;
        if kind == b'K' || kind == b'O' {
            old = Some(self.tuple()?);
            kind = self.u8()?;
        }
        if kind != b'N' {
            return Err(ParseError(format!("update tuple kind {kind:#x}")));
        }
        Ok(Message::Update {
            relation,
            old,
            new: self.tuple()?,
        })
    }
}

/// Parses one message.
pub fn parse(bytes: &[u8]) -> Result<Message, ParseError> {
    let mut r = Reader { buf: bytes };
    let tag = r.u8()?;
    Ok(match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64()?,
            commit_time: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => {
            let _flags = r.u8()?;
            Message::Commit {
                commit_lsn: r.u64()?,
                end_lsn: r.u64()?,
                commit_time: r.i64()?,
            }
        }
        b'R' => r.relation()?,
        b'I' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'N' => Message::Insert {
                    relation,
                    new: r.tuple()?,
                },
                other => return Err(ParseError(format!("insert tuple kind {other:#x}"))),
            }
        }
        b'U' => r.update()?,
        b'D' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => Message::Delete {
                    relation,
                    old: r.tuple()?,
                },
                other => return Err(ParseError(format!("delete tuple kind {other:#x}"))),
            }
        }
        b'T' => {
            let n = r.i32()?;
            let _options = r.u8()?;
            let mut relations = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate { relations }
        }
        other => Message::Other(other),
    })
}

/// Microseconds since 2000-01-01 UTC (Postgres's epoch) as Unix seconds.
pub fn unix_seconds(pg_micros: i64) -> f64 {
    const PG_EPOCH: i64 = 946_684_800;
    PG_EPOCH as f64 + pg_micros as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(cols: &[Option<&str>]) -> Vec<u8> {
        let mut b = (cols.len() as i16).to_be_bytes().to_vec();
        for c in cols {
            match c {
                None => b.push(b'n'),
                Some(s) => {
                    b.push(b't');
                    b.extend((s.len() as i32).to_be_bytes());
                    b.extend(s.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn transactions_and_changes_parse() {
        let mut begin = vec![b'B'];
        begin.extend(0x1_0000_0010u64.to_be_bytes());
        begin.extend(5_000_000i64.to_be_bytes());
        begin.extend(7u32.to_be_bytes());
        assert_eq!(
            parse(&begin).unwrap(),
            Message::Begin {
                final_lsn: 0x1_0000_0010,
                commit_time: 5_000_000,
                xid: 7
            }
        );

        let mut rel = vec![b'R'];
        rel.extend(16384u32.to_be_bytes());
        rel.extend(b"public\0subscribers_restaurants\0");
        rel.push(b'd');
        rel.extend(2i16.to_be_bytes());
        for (name, oid) in [("id", 20u32), ("client_id", 2950)] {
            rel.push(0);
            rel.extend(name.as_bytes());
            rel.push(0);
            rel.extend(oid.to_be_bytes());
            rel.extend((-1i32).to_be_bytes());
        }
        let Message::Relation {
            oid, name, columns, ..
        } = parse(&rel).unwrap()
        else {
            panic!("a relation")
        };
        assert_eq!((oid, name.as_str()), (16384, "subscribers_restaurants"));
        assert_eq!(columns[1].name, "client_id");
        assert_eq!(columns[1].type_oid, 2950);

        let mut ins = vec![b'I'];
        ins.extend(16384u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(tuple(&[Some("42"), Some("abc")]));
        assert_eq!(
            parse(&ins).unwrap(),
            Message::Insert {
                relation: 16384,
                new: vec![Value::Text("42".into()), Value::Text("abc".into())]
            }
        );

        let mut upd = vec![b'U'];
        upd.extend(16384u32.to_be_bytes());
        upd.push(b'K');
        upd.extend(tuple(&[Some("41"), None]));
        upd.push(b'N');
        upd.extend(tuple(&[Some("42"), Some("x")]));
        let Message::Update { old, new, .. } = parse(&upd).unwrap() else {
            panic!("an update")
        };
        assert_eq!(old.unwrap()[1], Value::Null);
        assert_eq!(new[0], Value::Text("42".into()));

        let mut del = vec![b'D'];
        del.extend(16384u32.to_be_bytes());
        del.push(b'K');
        del.extend(tuple(&[Some("42"), None]));
        assert!(matches!(parse(&del).unwrap(), Message::Delete { .. }));

        let mut tr = vec![b'T'];
        tr.extend(2i32.to_be_bytes());
        tr.push(0);
        tr.extend(1u32.to_be_bytes());
        tr.extend(2u32.to_be_bytes());
        assert_eq!(
            parse(&tr).unwrap(),
            Message::Truncate {
                relations: vec![1, 2]
            }
        );

        let mut commit = vec![b'C', 0];
        commit.extend(0x10u64.to_be_bytes());
        commit.extend(0x18u64.to_be_bytes());
        commit.extend(9i64.to_be_bytes());
        assert_eq!(
            parse(&commit).unwrap(),
            Message::Commit {
                commit_lsn: 0x10,
                end_lsn: 0x18,
                commit_time: 9
            }
        );
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        for bytes in [
            &b"B\x00\x01"[..],
            b"I\x00\x00\x00\x01N\x00\x02t\x00\x00\x00\x09ab",
            b"",
        ] {
            assert!(parse(bytes).is_err(), "{bytes:?}");
        }
        assert_eq!(parse(b"Yxyz").unwrap(), Message::Other(b'Y'));
    }
}
