//! `docs/wire.md` is the protocol's contract for people; these tests keep its tables (status
//! codes, frame error codes, operations and roles) in step with the code.

use stockplane_wire::{frame::FrameError, HoldId, HoldsOf, Op, Status};

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/wire.md");
    std::fs::read_to_string(path).expect("read docs/wire.md")
}

/// The cells of every Markdown table row in `doc`, trimmed.
fn rows(doc: &str) -> Vec<Vec<String>> {
    doc.lines()
        .filter(|line| line.trim_start().starts_with('|'))
        .map(|line| line.trim().trim_matches('|').split('|').map(|cell| cell.trim().to_string()).collect())
        .collect()
}

/// The row whose second cell is `name` in backquotes.
fn row<'a>(rows: &'a [Vec<String>], name: &str) -> &'a [String] {
    let quoted = format!("`{name}`");
    rows.iter()
        .find(|row| row.get(1) == Some(&quoted) || row.first() == Some(&quoted))
        .unwrap_or_else(|| panic!("docs/wire.md has no table row for {quoted}"))
}

/// The variant name of a value's `Debug` form: `Oversized { .. }` gives `Oversized`.
fn variant_name(debug: &str) -> &str {
    let end = debug.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(debug.len());
    &debug[..end]
}

#[test]
fn every_status_is_documented_with_its_number_and_retry_class() {
    let doc = doc();
    let rows = rows(&doc);
    for status in Status::ALL {
        let row = row(&rows, &format!("{status:?}"));
        assert_eq!(row[0], status.code().to_string(), "number of {status:?}");
        let retry = &row[3];
        if status.is_success() {
            assert_eq!(retry, "—", "retry column of {status:?}");
        } else {
            assert_eq!(retry.starts_with("yes"), status.is_retryable(), "retry column of {status:?}");
        }
    }
}

#[test]
fn every_frame_error_is_documented_with_its_code() {
    let doc = doc();
    let rows = rows(&doc);
    let errors = FrameError::kinds();
    for error in errors {
        let debug = format!("{error:?}");
        let name = variant_name(&debug);
        let row = row(&rows, name);
        assert_eq!(row[0], error.code().to_string(), "code of {name}");
    }
}

#[test]
fn every_operation_is_documented_with_its_roles() {
    let doc = doc();
    let rows = rows(&doc);
    let hold = HoldId(1);
    let ops = [
        Op::Reserve { hold, ttl_ms: 1, lines: Vec::new() },
        Op::Commit { hold, lines: None },
        Op::Release { hold },
        Op::Extend { hold, ttl_ms: 1 },
        Op::QueryStock { items: Vec::new() },
        Op::QueryHolds { of: HoldsOf::Hold(hold) },
        Op::UpsertSku { sku: 1, location: 1, backorder_limit: 0 },
        Op::Adjust { adjustment: 1, sku: 1, location: 1, delta: 1 },
        Op::Journal { shard: 0, from: 0, max_entries: 1 },
    ];
    for op in ops {
        let debug = format!("{op:?}");
        let name = variant_name(&debug);
        let row = row(&rows, name);
        let checkout = if op.is_control_only() { "no" } else { "yes" };
        assert_eq!(row[2], checkout, "checkout column of {name}");
        assert_eq!(row[3], "yes", "control column of {name}");
    }
}

#[test]
fn every_connection_close_code_is_documented() {
    use stockplane_wire::transport::close;
    let doc = doc();
    let rows = rows(&doc);
    for (name, code) in [
        ("NORMAL", close::NORMAL),
        ("NO_ROLE", close::NO_ROLE),
        ("SHUTTING_DOWN", close::SHUTTING_DOWN),
        ("PROTOCOL_VIOLATION", close::PROTOCOL_VIOLATION),
    ] {
        let row = row(&rows, name);
        assert_eq!(row[0], format!("`{code:#x}`"), "code of {name}");
    }
    assert!(doc.contains(&format!("`{}`", String::from_utf8_lossy(stockplane_wire::transport::ALPN))));
    assert!(doc.contains(stockplane_wire::transport::ROLE_URI_PREFIX));
}
