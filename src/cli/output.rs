//! Output: aligned tables for people, one JSON object for scripts. A table
//! with no row says so in a line instead of printing only its header, and a
//! cell too long for its column is cut with `…` (`--json` has it whole);
//! colour only on a terminal, never with `NO_COLOR` set.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;
use serde_json::json;

use crate::grpc::pb;
use crate::model::Timestamp;

#[derive(Debug, Serialize)]
pub struct KeyOut {
    pub key_id: String,
    pub alias: String,
    pub state: String,
    pub primary_version: u32,
    pub min_decryption_version: u32,
    pub protection_level: String,
    pub created: String,
    pub created_by: String,
    pub description: String,
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation_period_secs: Option<i64>,
    /// The rotation period as the operator gave it (`90d`), else in the
    /// largest unit that divides it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation_period: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_rotation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletion: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destroyed: Option<String>,
    /// The deletion window the operator gave (`--days`), after a
    /// `schedule-deletion`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletion_window_days: Option<u32>,
    /// What the server found wrong with the policy it was given (a grant
    /// naming a principal no role knows, ...), after `create` or `policy set`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl KeyOut {
    /// The rotation period in the words `given` (e.g. `90d`), when it is the
    /// period the server answered with.
    pub fn with_given_period(mut self, given: Option<&crate::cli::args::Period>) -> Self {
        if let Some(p) = given {
            if self.rotation_period_secs == i64::try_from(p.secs).ok() {
                self.rotation_period = Some(p.text.clone());
            }
        }
        self
    }
}

/// Whether to colour output on a stream that is (`tty`) or is not a
/// terminal: only on a terminal, and not when `NO_COLOR` is set to anything
/// (<https://no-color.org>) or `TERM` is `dumb`.
pub fn colour(tty: bool) -> bool {
    tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        && std::env::var_os("TERM").is_none_or(|t| t != "dumb")
}

/// Prints the server's warnings on standard error, one line each.
pub fn warnings(warnings: &[String]) {
    use std::io::IsTerminal;
    let prefix = if colour(std::io::stderr().is_terminal()) {
        "\x1b[1;33mwarning:\x1b[0m"
    } else {
        "warning:"
    };
    for w in warnings {
        eprintln!("{prefix} {w}");
    }
}

fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.map(|t| Timestamp(t.seconds.saturating_mul(1000)).to_rfc3339())
        .unwrap_or_default()
}

impl From<&pb::KeyMetadata> for KeyOut {
    fn from(k: &pb::KeyMetadata) -> Self {
        Self {
            key_id: k.key_id.clone(),
            alias: k.alias.clone(),
            state: k.state().as_str_name().to_string(),
            primary_version: k.primary_version,
            min_decryption_version: k.min_decryption_version,
            protection_level: k.protection_level().as_str_name().to_string(),
            created: time(k.create_time.as_ref()),
            created_by: k.created_by.clone(),
            description: k.description.clone(),
            labels: k.labels.clone().into_iter().collect(),
            rotation_period_secs: k.rotation_period.as_ref().map(|d| d.seconds),
            rotation_period: k.rotation_period.as_ref().map(|d| human_period(d.seconds)),
            next_rotation: k.next_rotation_time.as_ref().map(|t| time(Some(t))),
            deletion: k.deletion_time.as_ref().map(|t| time(Some(t))),
            destroyed: k.destroy_time.as_ref().map(|t| time(Some(t))),
            deletion_window_days: None,
            warnings: Vec::new(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct VersionOut {
    pub version: u32,
    pub state: String,
    pub created: String,
    pub hsm_root_key_id: u32,
}

impl From<&pb::KeyVersion> for VersionOut {
    fn from(v: &pb::KeyVersion) -> Self {
        Self {
            version: v.version,
            state: v
                .state()
                .as_str_name()
                .trim_start_matches("VERSION_")
                .to_string(),
            created: time(v.create_time.as_ref()),
            hsm_root_key_id: v.hsm_root_key_id,
        }
    }
}

/// `--field NAME`, set once by `main` from the command line.
static FIELD: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Makes every JSON output print only `field` (see [`print_json`]).
pub(super) fn select_field(field: String) {
    let _ = FIELD.set(field);
}

/// Prints a command's JSON output: the whole object, or with `--field` only
/// that field, raw: a string without its quotes, anything else as compact
/// JSON. A field the output does not have is an error naming those it has.
pub(super) fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    match FIELD.get() {
        None => println!("{}", serde_json::to_string_pretty(value)?),
        Some(path) => println!("{}", field_text(value, path)?),
    }
    Ok(())
}

/// A JSON text printed as it is (a checkpoint line must stay byte for byte
/// what the server signed), or its `--field`.
pub(super) fn print_json_line(text: &str) -> anyhow::Result<()> {
    match FIELD.get() {
        None => println!("{text}"),
        Some(path) => println!("{}", field_text(&serde_json::from_str(text)?, path)?),
    }
    Ok(())
}

fn field_text(value: &serde_json::Value, path: &str) -> anyhow::Result<String> {
    let mut at = value;
    for part in path.split('.') {
        let next = match at {
            serde_json::Value::Object(map) => map.get(part),
            serde_json::Value::Array(list) => part.parse::<usize>().ok().and_then(|i| list.get(i)),
            _ => None,
        };
        at = next.ok_or_else(|| {
            let has = match at {
                serde_json::Value::Object(map) => {
                    let keys: Vec<&str> = map.keys().map(String::as_str).collect();
                    format!("it has: {}", keys.join(", "))
                }
                serde_json::Value::Array(list) => format!("it is a list of {}", list.len()),
                other => format!("it is {other}"),
            };
            super::client::CliError::local(
                tonic::Code::InvalidArgument,
                format!("--field {path}: the output has no {part:?} ({has})"),
            )
        })?;
    }
    Ok(match at {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// Prints rows as columns padded to their widest cell; `empty` instead
/// when there is no row.
fn table(header: &[&str], rows: &[Vec<String>], empty: &str) {
    table_limited(header, rows, &[], empty);
}

/// [`table`], with the columns `limits` names (index, most characters) cut
/// to that width with `…`, so that one long cell does not push every other
/// column off the screen.
pub(super) fn table_limited(
    header: &[&str],
    rows: &[Vec<String>],
    limits: &[(usize, usize)],
    empty: &str,
) {
    if rows.is_empty() {
        println!("{empty}");
        return;
    }
    print!("{}", render_table(header, rows, limits));
}

/// The lines of [`table_limited`].
fn render_table(header: &[&str], rows: &[Vec<String>], limits: &[(usize, usize)]) -> String {
    let cut = |i: usize, cell: &str| -> String {
        match limits.iter().find(|(col, _)| *col == i) {
            Some((_, max)) if cell.chars().count() > *max => {
                let kept: String = cell.chars().take(max.saturating_sub(1)).collect();
                format!("{kept}…")
            }
            _ => cell.to_string(),
        }
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().enumerate().map(|(i, c)| cut(i, c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for row in &cells {
        out.push_str(&line(row));
    }
    out
}

pub fn key(key: &KeyOut, versions: &[VersionOut], json: bool) -> anyhow::Result<()> {
    if json {
        let mut value = serde_json::to_value(key)?;
        if !versions.is_empty() {
            if let Some(obj) = value.as_object_mut() {
                obj.insert("versions".into(), serde_json::to_value(versions)?);
            }
        }
        return print_json(&value);
    }
    let alias = if key.alias.is_empty() {
        "-"
    } else {
        &key.alias
    };
    println!("key id            {}", key.key_id);
    println!("alias             {alias}");
    println!("state             {}", key.state);
    println!("primary version   {}", key.primary_version);
    println!("min. decryption   {}", key.min_decryption_version);
    println!("protection        {}", key.protection_level);
    println!("created           {} by {}", key.created, key.created_by);
    if !key.description.is_empty() {
        println!("description       {}", key.description);
    }
    for (k, v) in &key.labels {
        println!("label             {k}={v}");
    }
    if let Some(p) = &key.rotation_period {
        println!("rotation          every {p}");
    }
    if let Some(t) = &key.next_rotation {
        println!("next rotation     {t}");
    }
    if let Some(t) = &key.deletion {
        let window = key
            .deletion_window_days
            .map(|d| format!("in {d} days; "))
            .unwrap_or_default();
        println!("destroyed at      {t}   ({window}cancel with `coffre key cancel-deletion`)");
    }
    if let Some(t) = &key.destroyed {
        println!("destroyed         {t}");
    }
    if !versions.is_empty() {
        println!();
        version_table(versions);
    }
    Ok(())
}

fn human_period(secs: i64) -> String {
    const DAY: i64 = 86_400;
    if secs % (365 * DAY) == 0 {
        format!("{}y", secs / (365 * DAY))
    } else if secs % DAY == 0 {
        format!("{}d", secs / DAY)
    } else if secs % 3600 == 0 {
        format!("{}h", secs / 3600)
    } else {
        format!("{secs}s")
    }
}

fn version_table(versions: &[VersionOut]) {
    let rows: Vec<Vec<String>> = versions
        .iter()
        .map(|v| {
            vec![
                v.version.to_string(),
                v.state.clone(),
                v.created.clone(),
                v.hsm_root_key_id.to_string(),
            ]
        })
        .collect();
    table(
        &["VERSION", "STATE", "CREATED", "HSM ROOT KEY"],
        &rows,
        "no versions",
    );
}

pub fn versions(versions: &[VersionOut], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&json!({ "versions": versions }));
    }
    version_table(versions);
    Ok(())
}

pub fn hsm_info(info: &pb::GetHsmInfoResponse, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&json!({
            "backend": info.backend,
            "label": info.label,
            "current_root_key_id": info.current_root_key_id,
            "root_key_ids": info.root_key_ids,
            "secure": info.secure,
        }));
    }
    println!("backend           {}", info.backend);
    println!("label             {}", info.label);
    println!("current root key  {}", info.current_root_key_id);
    println!("root keys         {:?}", info.root_key_ids);
    println!(
        "secure            {}",
        if info.secure {
            "yes"
        } else {
            "no (simulator: development only)"
        }
    );
    Ok(())
}

/// A one-line progress bar on standard error, redrawn in place when it is a
/// terminal (one line per update otherwise).
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    tty: bool,
    drawn: bool,
}

impl Progress {
    pub fn new(enabled: bool) -> Self {
        use std::io::IsTerminal;
        Self {
            enabled,
            tty: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    pub fn update(&mut self, p: &pb::RotateRootKeyProgress) {
        if !self.enabled {
            return;
        }
        let total = p.rewrapped.saturating_add(p.remaining);
        let pct = (p.rewrapped.saturating_mul(100))
            .checked_div(total)
            .unwrap_or(100);
        let width = 30u64;
        let filled = usize::try_from(pct * width / 100).unwrap_or(0);
        let bar = format!(
            "[{}{}]",
            "#".repeat(filled),
            " ".repeat(usize::try_from(width).unwrap_or(30).saturating_sub(filled))
        );
        let line = format!(
            "re-wrapping under root key {} {bar} {}/{} ({pct}%)",
            p.new_root_key_id, p.rewrapped, total
        );
        if self.tty {
            eprint!("\r{line}");
        } else {
            eprintln!("{line}");
        }
        self.drawn = true;
    }

    pub fn finish(&mut self) {
        if self.enabled && self.tty && self.drawn {
            eprintln!();
        }
    }
}

pub fn progress_json(p: &pb::RotateRootKeyProgress) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string(&json!({
            "new_root_key_id": p.new_root_key_id,
            "rewrapped": p.rewrapped,
            "remaining": p.remaining,
            "resumed": p.resumed,
            "done": p.done,
            "destroyed_root_key_ids": p.destroyed_root_key_ids,
        }))?
    );
    Ok(())
}

pub fn key_list(keys: &[KeyOut], next_page_token: &str, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&json!({ "keys": keys, "next_page_token": next_page_token }));
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.key_id.clone(),
                if k.alias.is_empty() {
                    "-".into()
                } else {
                    k.alias.clone()
                },
                k.state.clone(),
                k.primary_version.to_string(),
                k.created.clone(),
            ]
        })
        .collect();
    table_limited(
        &["KEY ID", "ALIAS", "STATE", "VERSION", "CREATED"],
        &rows,
        &[(1, 40)],
        "no keys match",
    );
    if !next_page_token.is_empty() {
        println!("\nmore keys: --page-token {next_page_token}   (or --all)");
    }
    Ok(())
}

pub fn data_key(
    plaintext: Option<&[u8]>,
    blob: &[u8],
    key_id: &str,
    key_version: u32,
    json: bool,
) -> anyhow::Result<()> {
    let blob64 = B64.encode(blob);
    let plain64 = plaintext.map(|p| zeroize::Zeroizing::new(B64.encode(p)));
    if json {
        let mut v = json!({
            "ciphertext_blob": blob64,
            "key_id": key_id,
            "key_version": key_version,
        });
        if let (Some(p), Some(obj)) = (&plain64, v.as_object_mut()) {
            obj.insert("plaintext".into(), json!(p.as_str()));
        }
        return print_json(&v);
    }
    println!("key id            {key_id}");
    println!("key version       {key_version}");
    if let Some(p) = &plain64 {
        println!("plaintext         {}", p.as_str());
    }
    println!("ciphertext_blob   {blob64}");
    Ok(())
}

/// The data keys of one batch: one line (or JSON object) per key.
pub fn data_keys(
    resp: crate::grpc::pb::BatchGenerateDataKeyResponse,
    json: bool,
) -> anyhow::Result<()> {
    let items: Vec<serde_json::Value> = resp
        .data_keys
        .into_iter()
        .map(|k| {
            let plaintext = zeroize::Zeroizing::new(k.plaintext);
            match k.error {
                Some(e) => json!({ "error": { "code": e.code, "message": e.message } }),
                None if plaintext.is_empty() => {
                    json!({ "ciphertext_blob": B64.encode(&k.ciphertext_blob) })
                }
                None => json!({
                    "plaintext": B64.encode(&*plaintext),
                    "ciphertext_blob": B64.encode(&k.ciphertext_blob),
                }),
            }
        })
        .collect();
    if json {
        return print_json(&json!({
            "key_id": resp.key_id,
            "key_version": resp.key_version,
            "data_keys": items,
        }));
    }
    println!("key id            {}", resp.key_id);
    println!("key version       {}", resp.key_version);
    for (i, item) in items.iter().enumerate() {
        match (
            item.get("plaintext"),
            item.get("ciphertext_blob"),
            item.get("error"),
        ) {
            (_, _, Some(e)) => println!("{:>4}  error {e}", i + 1),
            (Some(p), Some(b), _) => println!(
                "{:>4}  plaintext {}  ciphertext_blob {}",
                i + 1,
                p.as_str().unwrap_or(""),
                b.as_str().unwrap_or("")
            ),
            (None, Some(b), _) => {
                println!("{:>4}  ciphertext_blob {}", i + 1, b.as_str().unwrap_or(""))
            }
            _ => {}
        }
    }
    Ok(())
}

pub fn ciphertext(
    blob: Option<&[u8]>,
    key_id: &str,
    key_version: u32,
    json: bool,
) -> anyhow::Result<()> {
    let blob64 = blob.map(|b| B64.encode(b));
    if json {
        return print_json(&json!({
            "ciphertext_blob": blob64,
            "key_id": key_id,
            "key_version": key_version,
        }));
    }
    println!("key id            {key_id}");
    println!("key version       {key_version}");
    if let Some(b) = blob64 {
        println!("ciphertext_blob   {b}");
    }
    Ok(())
}

pub fn plaintext(
    plain: Option<&[u8]>,
    key_id: &str,
    key_version: u32,
    json: bool,
) -> anyhow::Result<()> {
    let plain64 = plain.map(|p| zeroize::Zeroizing::new(B64.encode(p)));
    if json {
        return print_json(&json!({
            "plaintext": plain64.as_ref().map(|p| p.as_str()),
            "key_id": key_id,
            "key_version": key_version,
        }));
    }
    println!("key id            {key_id}");
    println!("key version       {key_version}");
    if let Some(p) = &plain64 {
        println!("plaintext         {}", p.as_str());
    }
    Ok(())
}

pub fn pending(approval_id: &str, json: bool) -> anyhow::Result<()> {
    pending_warned(approval_id, &[], json)
}

/// [`pending`], with the server's warnings about the proposal (in the
/// JSON object too, as `warnings`, when there are some).
pub fn pending_warned(approval_id: &str, warnings: &[String], json: bool) -> anyhow::Result<()> {
    if json {
        let mut value = json!({ "pending_approval_id": approval_id });
        if let (false, Some(obj)) = (warnings.is_empty(), value.as_object_mut()) {
            obj.insert("warnings".into(), json!(warnings));
        }
        return print_json(&value);
    }
    println!("this operation needs more approvals: it is pending as {approval_id}");
    println!("other operators review it with: coffre approval show {approval_id}");
    println!(
        "and approve it with: coffre approval approve {approval_id} --digest <operation_sha256>"
    );
    Ok(())
}

/// A policy from the wire as the JSON `coffre key policy show` prints.
fn policy_json(p: Option<&pb::KeyPolicy>) -> serde_json::Value {
    match p.map(|p| crate::grpc::convert::policy_from_pb(p.clone())) {
        Some(Ok(policy)) => serde_json::to_value(&policy).unwrap_or(serde_json::Value::Null),
        Some(Err(e)) => json!({ "unreadable": e.to_string() }),
        None => serde_json::Value::Null,
    }
}

fn approval_json(a: &pb::Approval) -> serde_json::Value {
    json!({
        "approval_id": a.approval_id,
        "operation": a.operation,
        "key_id": a.key_id,
        "proposer": a.proposer,
        "approved_by": a.approved_by,
        "approvals_required": a.approvals_required,
        "status": a.status().as_str_name().trim_start_matches("APPROVAL_"),
        "created": time(a.create_time.as_ref()),
        "expires": time(a.expire_time.as_ref()),
        "rejected_by": a.rejected_by,
        "result": a.result,
        "operation_sha256": a.operation_sha256,
        "changes": a.changes,
        "proposed_policy": policy_json(a.proposed_policy.as_ref()),
        "current_policy": policy_json(a.current_policy.as_ref()),
    })
}

/// The operation's kind: the first word of its title.
fn kind(a: &pb::Approval) -> &str {
    a.operation.split_whitespace().next().unwrap_or("")
}

pub fn approvals(approvals: &[pb::Approval], json: bool) -> anyhow::Result<()> {
    if json {
        let list: Vec<serde_json::Value> = approvals.iter().map(approval_json).collect();
        return print_json(&json!({ "approvals": list }));
    }
    let rows: Vec<Vec<String>> = approvals
        .iter()
        .map(|a| {
            vec![
                a.approval_id.clone(),
                a.status()
                    .as_str_name()
                    .trim_start_matches("APPROVAL_")
                    .to_string(),
                kind(a).to_string(),
                a.key_id.clone(),
                a.operation_sha256.chars().take(12).collect(),
                format!("{}/{}", a.approved_by.len(), a.approvals_required),
                time(a.expire_time.as_ref()),
                a.result.clone(),
            ]
        })
        .collect();
    table(
        &[
            "APPROVAL",
            "STATUS",
            "OPERATION",
            "KEY",
            "DIGEST",
            "VOTES",
            "EXPIRES",
            "RESULT",
        ],
        &rows,
        "no approvals match",
    );
    Ok(())
}

/// One approval in full, for the approver to decide on: what changes, the
/// whole proposed policy, the digest to approve.
pub fn approval_detail(a: &pb::Approval, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&approval_json(a));
    }
    println!("approval          {}", a.approval_id);
    println!(
        "status            {}",
        a.status().as_str_name().trim_start_matches("APPROVAL_")
    );
    println!("operation         {}", a.operation);
    if !a.key_id.is_empty() {
        println!("key               {}", a.key_id);
    }
    println!("proposer          {}", a.proposer);
    println!(
        "approvals         {}/{} ({})",
        a.approved_by.len(),
        a.approvals_required,
        a.approved_by.join(", ")
    );
    println!("created           {}", time(a.create_time.as_ref()));
    println!("expires           {}", time(a.expire_time.as_ref()));
    if !a.result.is_empty() {
        println!("result            {}", a.result);
    }
    println!("changes:");
    for line in &a.changes {
        println!("  {line}");
    }
    if a.proposed_policy.is_some() {
        println!("proposed policy (in full):");
        let text = serde_json::to_string_pretty(&policy_json(a.proposed_policy.as_ref()))?;
        for line in text.lines() {
            println!("  {line}");
        }
    }
    println!("operation_sha256  {}", a.operation_sha256);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_cells_are_cut_and_columns_fit_their_content() {
        let rows = vec![
            vec!["a".to_string(), "x".repeat(50), "end".to_string()],
            vec!["bb".to_string(), "short".to_string(), "end".to_string()],
        ];
        let text = render_table(&["K", "ALIAS", "S"], &rows, &[(1, 10)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "K   ALIAS       S");
        assert_eq!(lines[1], format!("a   {}…  end", "x".repeat(9)));
        assert_eq!(lines[2], "bb  short       end");
    }

    #[test]
    fn periods_read_in_the_largest_unit_that_divides_them() {
        assert_eq!(human_period(90 * 86_400), "90d");
        assert_eq!(human_period(365 * 86_400), "1y");
        assert_eq!(human_period(7200), "2h");
        assert_eq!(human_period(61), "61s");
    }

    #[test]
    fn no_colour_off_a_terminal() {
        assert!(!colour(false));
    }

    #[test]
    fn a_field_is_printed_raw_and_a_missing_one_names_what_there_is() {
        let out = serde_json::json!({
            "key_id": "k-1",
            "key_version": 2,
            "data_keys": [{"ciphertext_blob": "Q0YB"}],
        });
        assert_eq!(field_text(&out, "key_id").unwrap(), "k-1");
        assert_eq!(field_text(&out, "key_version").unwrap(), "2");
        assert_eq!(
            field_text(&out, "data_keys.0.ciphertext_blob").unwrap(),
            "Q0YB"
        );
        let err = field_text(&out, "ciphertext_blob").unwrap_err().to_string();
        assert!(err.contains("data_keys, key_id, key_version"), "{err}");
        let err = field_text(&out, "data_keys.3").unwrap_err().to_string();
        assert!(err.contains("a list of 1"), "{err}");
    }
}
