//! Reading multi-document YAML into resources.

use std::{collections::HashMap, path::Path};

use crate::{resource::Resource, ConfigError};

/// YAML parser limits. serde-saphyr's defaults (1,024 documents, 250,000 nodes) are too small
/// for a fleet's worth of Workloads in one file; callers bound the input's size instead (the
/// control plane's API refuses bodies over `--max-body-bytes`).
fn options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = 1_000_000;
    budget.max_nodes = 50_000_000;
    budget.max_events = 200_000_000;
    let mut o = serde_saphyr::Options::default();
    o.budget = Some(budget);
    o
}

/// Parse every document of `text` as plain JSON values (to store them as written). A plain
/// YAML scalar where the schema wants a string (`version: 1.10` in labels, `name: no`) is
/// stored as the string the typed reading ([`parse_documents`]) takes, its spelling: stored
/// as a number or boolean, the control plane could not read back what it had accepted, and
/// turned into one (`1.1`, `false`) it would store another name or label than it checked.
pub fn parse_values(file: &str, text: &str) -> Result<Vec<serde_json::Value>, ConfigError> {
    let mut o = options();
    // A non-finite float reads as null here, for `as_typed_reads` to tell a string (`.inf`
    // in a label) from a number that cannot be stored (JSON has no NaN or infinity).
    o.non_finite_float_policy = serde_saphyr::NonFiniteFloatPolicy::PassThrough;
    let mut docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple_with_options(text, o).map_err(|e| syntax(file, text, e))?;
    let mut spellings = None;
    for (i, d) in docs.iter_mut().enumerate().filter(|(_, d)| !d.is_null()) {
        as_typed_reads(d, |path| {
            spellings
                .get_or_insert_with(|| Spellings::of(text))
                .get(i, path)
                .cloned()
        })
        .map_err(|(at, message)| located(file, text, at.line, at.column, message))?;
    }
    Ok(docs)
}

/// Turn each number, boolean or non-finite float that the schema wants as a string into
/// that string, spelled as `spelling(path)` gives it (at most 256 of them; anything else
/// wrong is left for the checks). A non-finite float where a number is wanted is refused
/// where it is written.
fn as_typed_reads(
    doc: &mut serde_json::Value,
    mut spelling: impl FnMut(&[Seg]) -> Option<Spelled>,
) -> Result<(), (Spelled, String)> {
    use serde_json::Value;
    for _ in 0..256 {
        let Err(e) = serde_path_to_error::deserialize::<_, Resource>(&*doc) else {
            return Ok(());
        };
        let message = e.inner().to_string();
        let scalar = ["integer", "boolean", "floating point", "null"]
            .iter()
            .any(|t| message.starts_with(&format!("invalid type: {t}")));
        if !scalar {
            return Ok(());
        }
        let mut path = Vec::new();
        for seg in e.path().iter() {
            path.push(match seg {
                serde_path_to_error::Segment::Map { key } => Seg::Key(key.clone()),
                serde_path_to_error::Segment::Seq { index } => Seg::Index(*index),
                _ => return Ok(()),
            });
        }
        let mut at = &mut *doc;
        for seg in &path {
            at = match (seg, at) {
                (Seg::Key(key), Value::Object(m)) => match m.get_mut(key) {
                    Some(v) => v,
                    None => return Ok(()),
                },
                (Seg::Index(i), Value::Array(a)) => match a.get_mut(*i) {
                    Some(v) => v,
                    None => return Ok(()),
                },
                _ => return Ok(()),
            };
        }
        // The spelling, when the source has it at this path and it reads as this value
        // (it may not: a merge key's or an aliased mapping's scalars have other paths).
        let written = spelling(&path).filter(|w| spelled_as(&w.text, at));
        if !message.contains("expected a string") {
            return match written {
                Some(w) if at.is_null() => {
                    let why = format!("{} is not a finite number", w.text);
                    Err((w, why))
                }
                _ => Ok(()),
            };
        }
        *at = match (written, &*at) {
            (Some(w), _) => Value::String(w.text),
            (None, Value::Number(n)) => Value::String(n.to_string()),
            (None, Value::Bool(b)) => Value::String(b.to_string()),
            _ => return Ok(()),
        };
    }
    Ok(())
}

/// Whether the plain scalar `written` reads as `value` (null for a non-finite float).
fn spelled_as(written: &str, value: &serde_json::Value) -> bool {
    if value.is_null() {
        // A null that is not spelled as one was a non-finite float.
        return !is_null(written);
    }
    let mut o = options();
    o.non_finite_float_policy = serde_saphyr::NonFiniteFloatPolicy::PassThrough;
    serde_saphyr::from_str_with_options::<serde_json::Value>(written, o)
        .ok()
        .as_ref()
        == Some(value)
}

/// Whether a plain scalar is spelled as YAML's null.
fn is_null(written: &str) -> bool {
    matches!(written.trim(), "" | "~" | "null" | "Null" | "NULL")
}

/// One step of a path inside a document.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Seg {
    Key(String),
    Index(usize),
}

/// The text of each plain scalar in a value's place, by document (counting those
/// `serde_saphyr` returns: not the empty ones) and path, as the typed reading meets it:
/// through aliases and merge keys (`<<`) too. Made once per file, and only when a document
/// needs it.
struct Spellings(HashMap<(usize, Vec<Seg>), Spelled>);

/// A plain scalar as written, and where (1-based).
#[derive(Clone, Debug)]
struct Spelled {
    text: String,
    line: u64,
    column: u64,
}

impl Spellings {
    fn of(text: &str) -> Self {
        // What anchors hold and aliases repeat is kept up to the file's size in spellings
        // (nested anchors and aliases could make it grow faster than the file: serde_saphyr
        // bounds what it replays, this what the walk keeps of it).
        let mut walk = Walk {
            repeats_left: text.len(),
            ..Walk::default()
        };
        for ev in serde_saphyr::granit_parser::Parser::new_from_str(text) {
            let Ok((ev, span)) = ev else { break };
            walk.event(ev, span.start.line() as u64, span.start.col() as u64 + 1);
        }
        Self(walk.found)
    }

    fn get(&self, doc: usize, path: &[Seg]) -> Option<&Spelled> {
        self.0.get(&(doc, path.to_vec()))
    }
}

/// The walk of the parser's events that makes [`Spellings`].
#[derive(Default)]
struct Walk {
    found: HashMap<(usize, Vec<Seg>), Spelled>,
    stack: Vec<Level>,
    /// The document being walked, when it counts; how many counted so far; whether it has
    /// its root node yet.
    doc: Option<usize>,
    docs: usize,
    has_root: bool,
    /// What each anchor of the document holds: the spellings of its plain scalars by path
    /// under it (the empty path for an anchored scalar).
    anchors: HashMap<usize, Vec<(Vec<Seg>, Spelled)>>,
    /// The anchored collections being walked: anchor, the stack's depth inside, path.
    open: Vec<(usize, usize, Vec<Seg>)>,
    /// How many more spellings anchors may hold and aliases repeat.
    repeats_left: usize,
}

impl Walk {
    fn event(&mut self, ev: serde_saphyr::granit_parser::Event<'_>, line: u64, column: u64) {
        use serde_saphyr::granit_parser::{Event, ScalarStyle};
        if matches!(ev, Event::DocumentStart(..)) {
            self.stack.clear();
            self.anchors.clear();
            self.open.clear();
            self.has_root = false;
        }
        let node = matches!(
            ev,
            Event::Scalar(..)
                | Event::SequenceStart(..)
                | Event::MappingStart(..)
                | Event::Alias(_)
        );
        if node && !self.has_root {
            self.has_root = true;
            // serde_saphyr leaves out a document that is null (an empty one too).
            let null = matches!(&ev, Event::Scalar(v, ScalarStyle::Plain, _, None) if is_null(v));
            self.doc = (!null).then_some(self.docs);
            self.docs += usize::from(!null);
        }
        let at_key = match self.stack.last_mut() {
            Some(Level::Map { key, at_key }) if *at_key => {
                // A key: the scalar it is (an alias's, the scalar it refers to).
                *key = match &ev {
                    Event::Scalar(v, ..) => Some(v.to_string()),
                    Event::Alias(id) => match self.anchors.get(id).map(Vec::as_slice) {
                        Some([(p, s)]) if p.is_empty() => Some(s.text.clone()),
                        _ => None,
                    },
                    _ => None,
                };
                *at_key = false;
                true
            }
            _ => false,
        };
        match ev {
            Event::Scalar(v, style, anchor, _) if !at_key => {
                let spelled = Spelled {
                    text: v.to_string(),
                    line,
                    column,
                };
                let plain = matches!(style, ScalarStyle::Plain);
                if anchor != 0 {
                    let held = plain.then(|| (Vec::new(), spelled.clone()));
                    self.anchors.insert(anchor, held.into_iter().collect());
                }
                if plain {
                    self.record(Vec::new(), spelled);
                }
                end_value(&mut self.stack);
            }
            Event::Alias(id) if !at_key => {
                let n = self.anchors.get(&id).map_or(0, Vec::len);
                if let Some(left) = self.repeats_left.checked_sub(n) {
                    self.repeats_left = left;
                    for (under, spelled) in self.anchors.get(&id).cloned().unwrap_or_default() {
                        self.record(under, spelled);
                    }
                }
                end_value(&mut self.stack);
            }
            Event::MappingStart(_, anchor, _) | Event::SequenceStart(_, anchor, _) => {
                if let (true, Some(p)) = (anchor != 0, self.path()) {
                    self.anchors.insert(anchor, Vec::new());
                    self.open.push((anchor, self.stack.len() + 1, p));
                }
                self.stack.push(match ev {
                    Event::MappingStart(..) => Level::Map {
                        key: None,
                        at_key: true,
                    },
                    _ => Level::Seq { index: 0 },
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                let depth = self.stack.len();
                self.open.retain(|(_, d, _)| *d <= depth);
                end_value(&mut self.stack);
            }
            _ => {}
        }
    }

    /// The path of the node the walk is at (none inside a key that is not a scalar).
    fn path(&self) -> Option<Vec<Seg>> {
        self.stack
            .iter()
            .map(|l| match l {
                Level::Map {
                    key: Some(k),
                    at_key: false,
                } => Some(Seg::Key(k.clone())),
                Level::Map { .. } => None,
                Level::Seq { index } => Some(Seg::Index(*index)),
            })
            .collect()
    }

    /// A plain scalar at `under` the node the walk is at: for the anchors it is in, and for
    /// the document at its path as read, where a merge key's (`<<`) entries do not replace
    /// the mapping's own.
    fn record(&mut self, under: Vec<Seg>, spelled: Spelled) {
        let Some(mut at) = self.path() else { return };
        at.extend(under);
        for (id, _, base) in &self.open {
            if let (Some(held), Some(rest), Some(left)) = (
                self.anchors.get_mut(id),
                at.strip_prefix(&base[..]),
                self.repeats_left.checked_sub(1),
            ) {
                self.repeats_left = left;
                held.push((rest.to_vec(), spelled.clone()));
            }
        }
        let Some(doc) = self.doc else { return };
        let mut read = Vec::with_capacity(at.len());
        let mut merged = false;
        let mut segs = at.into_iter().peekable();
        while let Some(seg) = segs.next() {
            if seg == Seg::Key("<<".into()) {
                merged = true;
                // `<<: [*a, *b]` merges each mapping of the sequence.
                segs.next_if(|s| matches!(s, Seg::Index(_)));
            } else {
                read.push(seg);
            }
        }
        let entry = self.found.entry((doc, read));
        if merged {
            entry.or_insert(spelled);
        } else {
            entry.insert_entry(spelled);
        }
    }
}

fn syntax(file: &str, text: &str, e: serde_saphyr::Error) -> ConfigError {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    located(
        file,
        text,
        line,
        column,
        bare_message(&first_line(&e.to_string())),
    )
}

/// An error at `line`:`column` of `text`, its message prefixed with the resource and the
/// field there.
fn located(file: &str, text: &str, line: u64, column: u64, message: String) -> ConfigError {
    // Name the field the error is at, and the resource it belongs to. A missing field is
    // reported at the last key of the mapping that lacks it: name that mapping.
    let message = match field_at(text, line, column) {
        Some(at) => {
            let path = if message.starts_with("missing field") {
                at.mapping
            } else {
                at.path
            };
            if path.is_empty() {
                format!("{}: {message}", at.resource)
            } else {
                format!("{}: {path}: {message}", at.resource)
            }
        }
        None => message,
    };
    ConfigError::Syntax {
        file: file.to_string(),
        line,
        column,
        message,
    }
}

/// serde-saphyr's message without its `error: line L column C:` prefix (the location is
/// reported separately).
fn bare_message(m: &str) -> String {
    let rest = m.strip_prefix("error: ").unwrap_or(m);
    match rest.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
        Some((pos, msg)) if pos.contains(" column ") => msg.to_string(),
        _ => rest.to_string(),
    }
}

/// Where in the documents a position is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct FieldAt {
    /// `Kind namespace/name`, as far as the document says (`document 2` when it does not).
    pub(crate) resource: String,
    /// The dotted path of the node at the position (`spec.ports[0].port`); empty for the
    /// document itself.
    pub(crate) path: String,
    /// When that node is a key, the path of the mapping it is a key of (`spec.ports[0]`);
    /// otherwise the node's own path.
    pub(crate) mapping: String,
}

/// One level of the path being walked.
enum Level {
    Map { key: Option<String>, at_key: bool },
    Seq { index: usize },
}

/// The field at `line`:`column` (1-based) of `text`: the last node that starts at or before
/// it, walked with the YAML parser's own events. Only run when an error is reported.
pub(crate) fn field_at(text: &str, line: u64, column: u64) -> Option<FieldAt> {
    use serde_saphyr::granit_parser::{Event, Parser};
    if line == 0 {
        return None;
    }
    let target = (line as usize, column.saturating_sub(1) as usize);
    let mut stack: Vec<Level> = Vec::new();
    // The document, the node's path, and the path of the mapping it is a key of.
    let mut found: Option<(usize, String, String)> = None;
    // Per document: kind, metadata.name, metadata.namespace.
    let mut docs: Vec<[Option<String>; 3]> = Vec::new();
    let path = |stack: &[Level]| -> String {
        let mut p = String::new();
        for l in stack {
            match l {
                Level::Map {
                    key: Some(k),
                    at_key: false,
                } => {
                    if !p.is_empty() {
                        p.push('.');
                    }
                    p.push_str(k);
                }
                Level::Map { .. } => {}
                Level::Seq { index } => p.push_str(&format!("[{index}]")),
            }
        }
        p
    };
    for ev in Parser::new_from_str(text) {
        let Ok((ev, span)) = ev else { break };
        let pos = (span.start.line(), span.start.col());
        let is_node = matches!(
            ev,
            Event::Scalar(..)
                | Event::SequenceStart(..)
                | Event::MappingStart(..)
                | Event::Alias(_)
        );
        if matches!(ev, Event::DocumentStart(..)) {
            docs.push(Default::default());
            stack.clear();
        }
        if is_node && pos <= target {
            // A key is reported as the field it names.
            let at_key = matches!(stack.last(), Some(Level::Map { at_key: true, .. }));
            let mapping = path(&stack);
            let mut p = mapping.clone();
            if at_key {
                if let Event::Scalar(k, ..) = &ev {
                    if !p.is_empty() {
                        p.push('.');
                    }
                    p.push_str(k);
                }
            }
            let mapping = if at_key { mapping } else { p.clone() };
            found = Some((docs.len(), p, mapping));
        }
        if is_node
            && pos > target
            && found.is_some()
            && docs.len() > found.as_ref().map_or(0, |f| f.0)
        {
            break;
        }
        // The document's kind and name, for the message's prefix.
        if let (Event::Scalar(v, ..), Some(d)) = (&ev, docs.last_mut()) {
            let here = path(&stack);
            let slot = match (here.as_str(), stack.last()) {
                ("kind", Some(Level::Map { at_key: false, .. })) => Some(0),
                ("metadata.name", Some(Level::Map { at_key: false, .. })) => Some(1),
                ("metadata.namespace", Some(Level::Map { at_key: false, .. })) => Some(2),
                _ => None,
            };
            if let Some(i) = slot {
                d[i] = Some(v.to_string());
            }
        }
        // Advance the walk.
        match ev {
            Event::Scalar(ref v, ..) => {
                if let Some(Level::Map { key, at_key }) = stack.last_mut() {
                    if *at_key {
                        *key = Some(v.to_string());
                        *at_key = false;
                        continue;
                    }
                }
                end_value(&mut stack);
            }
            Event::Alias(_) => end_value(&mut stack),
            Event::MappingStart(..) => stack.push(Level::Map {
                key: None,
                at_key: true,
            }),
            Event::SequenceStart(..) => stack.push(Level::Seq { index: 0 }),
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                end_value(&mut stack);
            }
            _ => {}
        }
    }
    let (doc, path, mapping) = found?;
    let d = docs.get(doc.checked_sub(1)?)?;
    let resource = match (&d[0], &d[1]) {
        (Some(kind), Some(name)) => {
            let ns = d[2].as_deref().unwrap_or("default");
            format!("{kind} {ns}/{name}")
        }
        (Some(kind), None) => kind.clone(),
        _ => format!("document {doc}"),
    };
    Some(FieldAt {
        resource,
        path,
        mapping,
    })
}

/// A value ended: its map expects the next key, its sequence the next item.
fn end_value(stack: &mut [Level]) {
    match stack.last_mut() {
        Some(Level::Map { at_key, .. }) => *at_key = true,
        Some(Level::Seq { index }) => *index += 1,
        None => {}
    }
}

/// Parse every document of `text`; `file` is only used in error messages.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Resource>, ConfigError> {
    serde_saphyr::from_multiple_with_options::<Resource>(text, options())
        .map_err(|e| syntax(file, text, e))
}

/// One document given as JSON (an agent's registration, say), checked as a file's would be;
/// an error names the field's path (`spec.ports.http`).
pub fn resource_from_json(file: &str, doc: &serde_json::Value) -> Result<Resource, ConfigError> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::invalid(file, 0, path, first_line(&e.into_inner().to_string()))
    })
}

/// Read and parse a file.
pub fn load_file(path: &Path) -> Result<Vec<Resource>, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        file: file.clone(),
        source,
    })?;
    parse_documents(&file, &text)
}

// saphyr renders a source snippet after the message; the location is reported separately.
fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syntax_error(text: &str) -> (u64, String) {
        match parse_documents("f.yaml", text).unwrap_err() {
            ConfigError::Syntax { line, message, .. } => (line, message),
            e => panic!("not a syntax error: {e}"),
        }
    }

    const SERVICE: &str = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: catalog, namespace: shop }\nspec:\n  selector: { app: catalog }\n";

    #[test]
    fn plain_scalars_where_strings_are_wanted_are_stored_as_the_typed_reading_takes_them() {
        // Found by the `resources` fuzz target: `version: 1` in labels was accepted by the
        // typed reading and stored as a number, which the control plane then could not read.
        let text = "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: 12, namespace: shop, labels: { version: 1, canary: true, w: 0.5 } }\nspec: { address: 127.0.0.1 }\n";
        let typed = parse_documents("f", text).unwrap();
        let values = parse_values("f", text).unwrap();
        let m = &values[0]["metadata"];
        assert_eq!(m["name"], "12");
        assert_eq!(m["labels"]["version"], "1");
        assert_eq!(m["labels"]["canary"], "true");
        assert_eq!(m["labels"]["w"], "0.5");
        let read = resource_from_json("f", &values[0]).expect("reads back");
        assert_eq!(read.metadata.labels, typed[0].metadata.labels);
        assert_eq!(read.id(), typed[0].id());
        // Found by the same target: `name: n` was stored as "false" (YAML 1.1 reads `n` as a
        // boolean), and `1.10` as "1.1": another name and label than the ones checked. Each
        // is stored as spelled, also through an anchor and in a later document after an
        // empty one.
        let spelled = [
            "n", "yes", "1.10", "0x1F", "1e3", ".inf", "007", "+5", "1_000", "-0.0",
        ];
        let labels: Vec<String> = spelled
            .iter()
            .enumerate()
            .map(|(i, v)| format!("l{i}: {v}"))
            .collect();
        let text = format!(
            "---\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: n, namespace: &ns 1.10, labels: {{ {}, alias: *ns }} }}\nspec: {{ address: 127.0.0.1 }}\n",
            labels.join(", ")
        );
        let typed = parse_documents("f", &text).unwrap();
        let values = parse_values("f", &text).unwrap();
        let read = resource_from_json("f", &values[0]).expect("reads back");
        assert_eq!(read.id().to_string(), "1.10/n");
        assert_eq!(read.id(), typed[0].id());
        assert_eq!(read.metadata.labels, typed[0].metadata.labels);
        for (i, v) in spelled.iter().enumerate() {
            assert_eq!(read.metadata.labels[&format!("l{i}")], *v);
        }
        assert_eq!(read.metadata.labels["alias"], "1.10");
        // Through merge keys and aliased mappings too: a mapping's own key wins over a
        // merged one, whichever comes first, and the first of merged mappings wins.
        let text = "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata:\n  <<: [{ name: off, labels: &l { a: 1.10, b: no } }, { name: on, namespace: 0x1F }]\n  labels:\n    <<: *l\n    b: n\n    c: 1.20\nspec: { address: 127.0.0.1 }\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { <<: { name: n, labels: &l2 { d: 1.30, e: 1.40 } }, name: y, labels: { <<: *l2, e: 1.50 } }\nspec: { address: 127.0.0.1 }\n";
        let typed = parse_documents("f", text).unwrap();
        let values = parse_values("f", text).unwrap();
        for (t, v) in typed.iter().zip(&values) {
            let read = resource_from_json("f", v).expect("reads back");
            assert_eq!(
                (read.id(), &read.metadata.labels),
                (t.id(), &t.metadata.labels)
            );
        }
        assert_eq!(values[0]["metadata"]["name"], "off");
        assert_eq!(values[0]["metadata"]["namespace"], "0x1F");
        assert_eq!(
            values[0]["metadata"]["labels"],
            serde_json::json!({ "a": "1.10", "b": "n", "c": "1.20" })
        );
        assert_eq!(values[1]["metadata"]["name"], "y");
        assert_eq!(
            values[1]["metadata"]["labels"],
            serde_json::json!({ "d": "1.30", "e": "1.50" })
        );
        // Where a number is wanted, a non-finite one (JSON has none) is refused where it is
        // written, as before the values were read with non-finite floats let through.
        let text = "apiVersion: trellis.dev/v1alpha1\nkind: Rollout\nmetadata: { name: web, namespace: shop }\nspec:\n  service: web\n  stable: web-v1\n  canary: web-v2\n  analysis: { maxLatencyRatio: 2, maxErrorRateIncrease: .nan }\n";
        parse_documents("f", text).expect("the typed reading takes NaN (the checks refuse it)");
        match parse_values("f", text).unwrap_err() {
            ConfigError::Syntax {
                line,
                column,
                message,
                ..
            } => {
                assert_eq!((line, column), (8, 57));
                assert_eq!(
                    message,
                    "Rollout shop/web: spec.analysis.maxErrorRateIncrease: .nan is not a finite number"
                );
            }
            e => panic!("{e}"),
        }
        // Numbers where numbers are wanted stay numbers.
        let svc = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: s }\nspec:\n  selector: { app: s }\n  ports: [{ port: 80 }]\n";
        assert_eq!(
            parse_values("f", svc).unwrap()[0]["spec"]["ports"][0]["port"],
            80
        );
    }

    #[test]
    fn schema_errors_name_the_field_and_what_is_allowed() {
        let (line, m) = syntax_error(&format!("{SERVICE}  ports: [{{ port: notanumber }}]\n"));
        assert_eq!(line, 6);
        assert_eq!(
            m,
            "Service shop/catalog: spec.ports[0].port: \"notanumber\" is not a port number 1-65535"
        );
        // Block style, the second item, a port out of range.
        let text =
            format!("{SERVICE}  ports:\n    - {{ port: 80 }}\n    - name: b\n      port: 70000\n");
        let (line, m) = syntax_error(&text);
        assert_eq!(line, 9);
        assert_eq!(
            m,
            "Service shop/catalog: spec.ports[1].port: 70000 is not a port number 1-65535"
        );
        // An unknown field is named by its own path; the resource is the second document's.
        let text = format!(
            "{SERVICE}  ports: [{{ port: 80 }}]\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: w }}\nspec:\n  address: 10.0.0.1\n  locality: {{ region: eu, zon: a }}\n"
        );
        let (line, m) = syntax_error(&text);
        assert_eq!(line, 13);
        assert!(
            m.starts_with("Workload default/w: spec.locality.zon: unknown field `zon`"),
            "{m}"
        );
        let (_, m) = syntax_error(&format!(
            "{SERVICE}  ports: [{{ port: 80, protocol: HTTQ }}]\n"
        ));
        assert!(
            m.starts_with("Service shop/catalog: spec.ports[0].protocol: unknown variant"),
            "{m}"
        );
        let text = "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: w, namespace: shop }\nspec: { address: 10.0.0.300, weight: -2 }\n";
        let (_, m) = syntax_error(text);
        assert_eq!(
            m,
            "Workload shop/w: spec.address: \"10.0.0.300\" is not an IP address (such as 10.0.0.5 or fd00::5)"
        );
    }

    #[test]
    fn a_json_document_is_checked_with_its_field_path() {
        let doc = serde_json::json!({
            "apiVersion": "trellis.dev/v1alpha1",
            "kind": "Workload",
            "metadata": { "name": "w", "namespace": "shop" },
            "spec": { "address": "10.0.0.1", "ports": { "http": 0 } },
        });
        let e = resource_from_json("agent:shop/w", &doc)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "agent:shop/w:0: spec.ports.http: 0 is not a port number 1-65535"
        );
        let ok = serde_json::json!({
            "apiVersion": "trellis.dev/v1alpha1",
            "kind": "Workload",
            "metadata": { "name": "w", "namespace": "shop" },
            "spec": { "address": "10.0.0.1", "ports": { "http": 8080 } },
        });
        assert_eq!(
            resource_from_json("f", &ok).unwrap().id().to_string(),
            "shop/w"
        );
    }

    #[test]
    fn what_aliases_repeat_is_kept_up_to_the_files_size() {
        // Ten levels of ten aliases each would be 10^10 spellings.
        let mut text = "a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n".to_string();
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            text += &format!("a{i}: &a{i} [{refs}]\n");
        }
        let s = Spellings::of(&text);
        assert!(
            s.0.len() <= 2 * text.len(),
            "{} of {}",
            s.0.len(),
            text.len()
        );
        // What fits is kept: the first level, and the first copies of it.
        assert_eq!(
            s.get(0, &[Seg::Key("a0".into()), Seg::Index(9)])
                .unwrap()
                .text,
            "10"
        );
        let at = [Seg::Key("a1".into()), Seg::Index(0), Seg::Index(9)];
        assert_eq!(s.get(0, &at).unwrap().text, "10");
    }

    #[test]
    fn a_position_maps_to_its_path() {
        let text =
            "a: 1\nb:\n  - x\n  - { c: [1, 2], d: e }\n---\nkind: K\nmetadata: { name: n }\n";
        let at = |l, c| field_at(text, l, c).unwrap();
        assert_eq!(at(1, 4).path, "a");
        assert_eq!(at(3, 5).path, "b[0]");
        assert_eq!(at(4, 11).path, "b[1].c[0]");
        assert_eq!(at(4, 14).path, "b[1].c[1]");
        assert_eq!(at(4, 18).path, "b[1].d", "a key is its field");
        assert_eq!(at(4, 18).mapping, "b[1]", "and belongs to its mapping");
        assert_eq!(at(4, 21).mapping, "b[1].d", "a value is its own");
        assert_eq!(at(4, 21).path, "b[1].d");
        assert_eq!(at(4, 21).resource, "document 1");
        assert_eq!(at(7, 19).path, "metadata.name");
        assert_eq!(at(7, 19).resource, "K default/n");
        assert_eq!(field_at(text, 0, 0), None);
    }

    #[test]
    fn a_missing_field_is_named_with_the_mapping_that_lacks_it() {
        // serde-saphyr reports a missing field at the last key of the mapping (or at an
        // empty mapping itself): the message names the mapping, not that last key.
        let cases = [
            (
                "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { namespace: x }\nspec:\n  selector: { app: s }\n",
                "Service: metadata: missing field `name`",
            ),
            (
                "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata:\n  namespace: x\nspec:\n  selector: { app: s }\n",
                "Service: metadata: missing field `name`",
            ),
            (
                "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {}\nspec:\n  selector: { app: s }\n",
                "Service: metadata: missing field `name`",
            ),
            (
                "kind: Service\nmetadata:\n  name: a\n",
                "Service default/a: missing field `apiVersion`",
            ),
            (
                "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: a }\nspec:\n  ports:\n    - protocol: HTTP\n      name: web\n",
                "Service default/a: spec.ports[0]: missing field `port`",
            ),
            (
                "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: a }\nspec:\n  ports: [{}]\n",
                "Service default/a: spec.ports[0]: missing field `port`",
            ),
        ];
        for (text, want) in cases {
            let (_, m) = syntax_error(text);
            assert!(m.starts_with(want), "{text:?}: {m}");
        }
    }

    #[test]
    fn a_fleet_sized_file_parses() {
        // More documents and nodes than serde-saphyr's default budget allows.
        let doc = "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: w, namespace: n, labels: { app: a } }\nspec: { address: 10.0.0.1, environment: vm, locality: { region: r, zone: z } }\n";
        let text = vec![doc; 12_000].join("---\n");
        assert_eq!(super::parse_documents("f", &text).unwrap().len(), 12_000);
        assert_eq!(super::parse_values("f", &text).unwrap().len(), 12_000);
    }
}
