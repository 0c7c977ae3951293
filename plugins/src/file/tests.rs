#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::record::sample;
use crate::units::ByteSize;

fn config(path: PathBuf, rotate: u64, keep: usize) -> FileConfig {
    FileConfig {
        path,
        rotate_bytes: ByteSize(rotate),
        keep,
        fsync: true,
    }
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn appends_envelopes_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/out.jsonl");
    let mut sink = FileSink::open("archive", "plant-7", config(path.clone(), 1 << 20, 2));
    let batch: Vec<_> = (1..=3)
        .map(|i| sample(i, "pump-1", &format!(r#"{{"n":{i}}}"#)))
        .collect();
    assert_eq!(sink.send(&batch).await.unwrap(), Ack::all(3));
    assert_eq!(sink.send(&batch[..1]).await.unwrap(), Ack::all(1));
    let got = lines(&path);
    let ns: Vec<_> = got
        .iter()
        .map(|l| l["payload"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, vec![1, 2, 3, 1]);
    assert_eq!(got[0]["site"], "plant-7");
    assert_eq!(got[0]["thing_name"], "pump-1");
}

#[tokio::test]
async fn rotates_and_keeps_only_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    let mut sink = FileSink::open("archive", "s", config(path.clone(), 1024, 2));
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(1100));
    for i in 1..=4 {
        sink.send(&[sample(i, "a", &big)]).await.unwrap();
    }
    // Each batch overflows 1KiB, so each ends in a rotation: .1 is the newest, .2 the one before.
    assert_eq!(lines(&rotated(&path, 1))[0]["record_id"], 4);
    assert_eq!(lines(&rotated(&path, 2))[0]["record_id"], 3);
    assert!(!rotated(&path, 3).exists());
    assert!(lines(&path).is_empty());
}

#[test]
fn validation_names_the_key() {
    let err = config(PathBuf::from("x"), 10, 1).validate().unwrap_err();
    assert!(err.contains("rotate_bytes"), "{err}");
}

#[tokio::test]
async fn an_unwritable_path_fails_sends_without_acknowledging() {
    let mut sink = FileSink::open(
        "archive",
        "s",
        config(PathBuf::from("/dev/null/x/out.jsonl"), 1 << 20, 1),
    );
    let err = sink.send(&[sample(1, "a", "{}")]).await.unwrap_err();
    assert!(err.retryable(), "{err}");
}

#[tokio::test]
async fn a_line_cut_short_by_a_crash_does_not_swallow_the_next_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    let whole = sample(1, "pump-1", r#"{"n":1}"#).envelope_bytes("plant-7");
    let mut text = whole.clone();
    text.push(b'\n');
    // The next batch's first line, interrupted halfway by SIGKILL.
    text.extend_from_slice(&whole[..whole.len() / 2]);
    std::fs::write(&path, &text).unwrap();
    let mut sink = FileSink::open("archive", "plant-7", config(path.clone(), 1 << 20, 2));
    let again = [sample(2, "pump-1", r#"{"n":2}"#)];
    assert_eq!(sink.send(&again).await.unwrap(), Ack::all(1));
    let text = std::fs::read_to_string(&path).unwrap();
    let readable: Vec<u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|l| l["payload"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(readable, vec![1, 2]);
    assert_eq!(
        text.lines().count(),
        3,
        "the fragment stays, on its own line"
    );
}
