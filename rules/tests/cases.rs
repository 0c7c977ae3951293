//! SQL rule cases as data files: every `tests/cases/*.sql` is a rule with its input and the
//! output it must produce, written in comments:
//!
//! ```text
//! -- input: {"topic":"dt/f-1/freezer","thing":"f-1","payload":{"temp":-5},"ts":1000}
//! -- expect alerts: {"thing":"f-1","temp":-5}
//! -- until: 70000            (optional: close windows as of this time)
//! ```
//!
//! An expected object matches when every key it names has that value (`@thing` checks the
//! record's identity). An Undefined result is left out (iot-sql-data-types): `-- left out: a, b`
//! names keys that no output row of the file may have, and `"@left_out": ["a"]` in an expected
//! row names keys that row may not have; `{"@raw": "TEXT"}` expects a non-JSON output.
//! `-- expect-error: TEXT` says the rule must be refused with TEXT in the reason.
//! `-- template SINK: TEXT` gives sink SINK that substitution template (as `[sinks.SINK]`'s
//! topic or partition key): its expressions are computed by the statements writing to SINK,
//! and `"@templates": ["…", …]` in an expected row names their values, in order.
//! `-- account_id: ID` is `[rules] account_id`. Inputs and expectations may also live beside the rule, in `NAME.input.jsonl` (one
//! message per line) and `NAME.expected.jsonl` (`{"sink": …, "row": {…}}` per line). Adding a
//! case is adding a file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use serde_json::Value;
use sitegate_rules::sample::{self, Sample};

fn subset(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => e
            .iter()
            .all(|(k, v)| a.get(k).is_some_and(|av| subset(v, av))),
        // Int and Decimal are different IoT types (iot-sql-data-types): an expected 8 must
        // come out as an Int, an expected 8.5 as a Decimal. SQL version 2016-03-23 outputs a
        // whole-number Decimal as an Int.
        (Value::Number(e), Value::Number(a)) => {
            e.is_f64() == a.is_f64() && e.as_f64() == a.as_f64()
        }
        _ => expected == actual,
    }
}

#[tokio::test]
async fn every_case_file_produces_its_expected_output() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let mut ran = 0;
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let mut inputs: Vec<Sample> = Vec::new();
        let mut left_out: Vec<String> = Vec::new();
        let mut expected: Vec<(String, Value)> = Vec::new();
        let mut until = None;
        let mut expect_error: Option<String> = None;
        let mut ctx = sitegate_rules::Context::default();
        let input_file = path.with_extension("input.jsonl");
        if input_file.exists() {
            inputs.extend(
                sample::parse_samples(&std::fs::read_to_string(&input_file).unwrap()).unwrap(),
            );
        }
        let expected_file = path.with_extension("expected.jsonl");
        if expected_file.exists() {
            for line in std::fs::read_to_string(&expected_file)
                .unwrap()
                .lines()
                .filter(|l| !l.trim().is_empty())
            {
                let v: Value = serde_json::from_str(line).unwrap();
                expected.push((v["sink"].as_str().unwrap().to_string(), v["row"].clone()));
            }
        }
        for line in text.lines() {
            let Some(c) = line.strip_prefix("--") else {
                continue;
            };
            let c = c.trim();
            if let Some(json) = c.strip_prefix("input:") {
                inputs.push(
                    serde_json::from_str(json.trim())
                        .unwrap_or_else(|e| panic!("{file}: input {json}: {e}")),
                );
            } else if let Some(rest) = c.strip_prefix("expect ") {
                let (sink, json) = rest
                    .split_once(':')
                    .unwrap_or_else(|| panic!("{file}: `-- expect SINK: {{…}}`"));
                expected.push((
                    sink.trim().to_string(),
                    serde_json::from_str(json.trim())
                        .unwrap_or_else(|e| panic!("{file}: expect {json}: {e}")),
                ));
            } else if let Some(keys) = c.strip_prefix("left out:") {
                left_out.extend(keys.split(',').map(|k| k.trim().to_string()));
            } else if let Some(e) = c.strip_prefix("expect-error:") {
                expect_error = Some(e.trim().to_string());
            } else if let Some(rest) = c.strip_prefix("template ") {
                let (sink, text) = rest
                    .split_once(':')
                    .unwrap_or_else(|| panic!("{file}: `-- template SINK: TEXT`"));
                let t = sitegate_plugins::template::Template::parse(text.trim())
                    .unwrap_or_else(|e| panic!("{file}: {e}"));
                ctx.templates
                    .insert(sink.trim().to_string(), t.expressions().to_vec());
            } else if let Some(a) = c.strip_prefix("account_id:") {
                ctx.account_id = Some(a.trim().to_string());
            } else if let Some(t) = c.strip_prefix("until:") {
                until = Some(t.trim().parse::<i64>().unwrap());
            }
        }
        let checked = sitegate_rules::check(&name, &file, &text, &ctx).await;
        if let Some(want) = expect_error {
            let e = checked.expect_err(&format!("{file}: should be refused"));
            assert!(
                e.to_string().contains(&want),
                "{file}: refused with {e}, expected {want:?}"
            );
            ran += 1;
            continue;
        }
        let spec = checked.unwrap_or_else(|e| panic!("{e}"));
        let outputs = sample::run(spec.clone(), &inputs, Some("errors".into()), until).await;
        compare(&file, "one by one", &outputs, &expected, &left_out);
        // Windows follow the clock, which a batch changes; every other rule gives each message
        // the same result whatever batch it came in.
        let upper = text.to_ascii_uppercase();
        if until.is_none() && !upper.contains("TUMBLE") && !upper.contains("HOP") {
            let outputs = sample::run_batch(spec, &inputs, Some("errors".into())).await;
            compare(&file, "in one batch", &outputs, &expected, &left_out);
        }
        ran += 1;
    }
    assert!(ran >= 30, "only {ran} case files");
}

fn compare(
    file: &str,
    how: &str,
    outputs: &[sitegate_rules::Output],
    expected: &[(String, Value)],
    left_out: &[String],
) {
    let table = sample::table(outputs);
    assert_eq!(
        outputs.len(),
        expected.len(),
        "{file} ({how}): expected {} rows, got\n{table}",
        expected.len()
    );
    for (i, ((sink, want), got)) in expected.iter().zip(outputs).enumerate() {
        assert_eq!(&got.sink, sink, "{file} ({how}): row {i} sink\n{table}");
        let mut want = want.clone();
        if let Some(values) = want.as_object_mut().and_then(|o| o.remove("@templates")) {
            assert_eq!(
                Value::from(got.template_values.clone()),
                values,
                "{file} ({how}): row {i} template values\n{table}"
            );
        }
        if let Some(thing) = want.as_object_mut().and_then(|o| o.remove("@thing")) {
            assert_eq!(
                Value::from(got.thing.clone()),
                thing,
                "{file} ({how}): row {i} identity\n{table}"
            );
        }
        // A binary output (binary-payloads: `SELECT *` of a non-JSON payload) is compared as
        // `{"@raw": "<its text>"}`.
        let actual: Value = serde_json::from_slice(&got.payload)
            .unwrap_or_else(|_| serde_json::json!({"@raw": String::from_utf8_lossy(&got.payload)}));
        let row_left_out = want
            .as_object_mut()
            .and_then(|o| o.remove("@left_out"))
            .and_then(|v| serde_json::from_value::<Vec<String>>(v).ok())
            .unwrap_or_default();
        for key in left_out.iter().chain(&row_left_out) {
            assert!(
                actual.get(key).is_none(),
                "{file} ({how}): row {i}: {key} should be left out (Undefined), got {actual}\n{table}"
            );
        }
        assert!(
            subset(&want, &actual),
            "{file} ({how}): row {i}: want {want} got {actual}\n{table}"
        );
    }
}
