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

/// The options of the plain-values reading: a non-finite float reads as null, for
/// `as_typed_reads` to tell a string (`.inf` in a label) from a number that cannot be
/// stored (JSON has no NaN or infinity).
fn values_options() -> serde_saphyr::Options {
    let mut o = options();
    o.non_finite_float_policy = serde_saphyr::NonFiniteFloatPolicy::PassThrough;
    o
}

/// Parse every document of `text` as plain JSON values (to store them as written). A plain
/// YAML scalar where the schema wants a string (`version: 1.10` in labels, `name: no`) is
/// stored as the string the typed reading ([`parse_documents`]) takes, its spelling: stored
/// as a number or boolean, the control plane could not read back what it had accepted, and
/// turned into one (`1.1`, `false`) it would store another name or label than it checked.
pub fn parse_values(file: &str, text: &str) -> Result<Vec<serde_json::Value>, ConfigError> {
    let mut docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple_with_options(text, values_options())
            .map_err(|e| syntax(file, text, e))?;
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
/// that string, spelled as `spelling(path)` gives it; anything else wrong is left for the
/// checks. A non-finite float where a number is wanted is refused where it is written.
///
/// Each pass reads the document once and mends what the first error names: a sequence's
/// items all at once (the schema wants each as a string), a mapping's one value. At most
/// [`MENDS`] passes a document, so a document with more scalars to mend (outside
/// sequences) is not mended whole, and `apply` refuses it as it does not read back.
fn as_typed_reads(
    doc: &mut serde_json::Value,
    mut spelling: impl FnMut(&[Seg]) -> Option<Spelled>,
) -> Result<(), (Spelled, String)> {
    use serde_json::Value;
    for _ in 0..MENDS {
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
        let Some((last, parent)) = path.split_last() else {
            return Ok(());
        };
        let mut at = &mut *doc;
        for seg in parent {
            match child_mut(at, seg) {
                Some(v) => at = v,
                None => return Ok(()),
            }
        }
        if !message.contains("expected a string") {
            // A number is wanted: null here is a non-finite float, which JSON cannot hold.
            return match (child_mut(at, last), spelling(&path)) {
                (Some(v), Some(w)) if v.is_null() && spelled_as(&w.text, v) => {
                    let why = format!("{} is not a finite number", w.text);
                    Err((w, why))
                }
                _ => Ok(()),
            };
        }
        let mended = match (last, at) {
            (Seg::Key(_), at) => child_mut(at, last).is_some_and(|v| as_string(v, spelling(&path))),
            (Seg::Index(_), Value::Array(items)) => {
                let mut item_path = path.clone();
                let mut any = false;
                for (j, v) in items.iter_mut().enumerate() {
                    if let Some(Seg::Index(n)) = item_path.last_mut() {
                        *n = j;
                    }
                    any |= !v.is_string() && as_string(v, spelling(&item_path));
                }
                any
            }
            _ => false,
        };
        if !mended {
            return Ok(());
        }
    }
    Ok(())
}

/// The child of `v` that `seg` names, if it has one.
fn child_mut<'a>(v: &'a mut serde_json::Value, seg: &Seg) -> Option<&'a mut serde_json::Value> {
    use serde_json::Value;
    match (seg, v) {
        (Seg::Key(k), Value::Object(m)) => m.get_mut(k),
        (Seg::Index(i), Value::Array(a)) => a.get_mut(*i),
        _ => None,
    }
}

/// How many passes [`as_typed_reads`] makes over one document.
const MENDS: usize = 4096;

/// Make `v` (a number, boolean or non-finite float) the string it is `written` as, or (no
/// spelling that reads as it) its own; whether it was.
fn as_string(v: &mut serde_json::Value, written: Option<Spelled>) -> bool {
    use serde_json::Value;
    *v = match (written.filter(|w| spelled_as(&w.text, v)), &*v) {
        (Some(w), _) => Value::String(w.text),
        (None, Value::Number(n)) => Value::String(n.to_string()),
        (None, Value::Bool(b)) => Value::String(b.to_string()),
        _ => return false,
    };
    true
}

/// Whether the plain scalar `written` reads as `value` (null for a non-finite float).
fn spelled_as(written: &str, value: &serde_json::Value) -> bool {
    if value.is_null() {
        // A null that is not spelled as one was a non-finite float.
        return !is_null(written);
    }
    serde_saphyr::from_str_with_options::<serde_json::Value>(written, values_options())
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

/// Each document's nodes as the parser gives them, aliases left as they are written: where
/// the typed reading meets a plain scalar, looked up by path through aliases and merge keys
/// (`<<`). As large as the file's events (an alias is one node however much it repeats);
/// made once per file, and only when a document needs it.
struct Spellings {
    nodes: Vec<Node>,
    /// The root node of each document serde_saphyr returns (it leaves out the null ones).
    roots: Vec<usize>,
}

/// A node of [`Spellings`].
enum Node {
    Scalar {
        spelled: Spelled,
        plain: bool,
    },
    /// Each key (its text; none for a key that is not a scalar) and its value.
    Map(Vec<(Option<String>, usize)>),
    Seq(Vec<usize>),
    /// The node the alias's anchor is on (none: an unknown anchor).
    Alias(Option<usize>),
}

/// A scalar as written, and where (1-based).
#[derive(Clone, Debug)]
struct Spelled {
    text: String,
    line: u64,
    column: u64,
}

/// How deep a lookup follows merge keys (serde_saphyr refuses a mapping that merges itself;
/// this bounds the lookup whatever the parser's events say).
const MERGE_DEPTH: usize = 64;

impl Spellings {
    fn of(text: &str) -> Self {
        use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle};
        let mut this = Self {
            nodes: Vec::new(),
            roots: Vec::new(),
        };
        let mut anchors: HashMap<usize, usize> = HashMap::new();
        // The collections open, each with (for a mapping) the key that waits for its value.
        let mut open: Vec<(usize, Option<Option<String>>)> = Vec::new();
        let mut has_root = false;
        for ev in Parser::new_from_str(text) {
            let Ok((ev, span)) = ev else { break };
            let (node, anchor, collection) = match ev {
                Event::DocumentStart(..) => {
                    open.clear();
                    anchors.clear();
                    has_root = false;
                    continue;
                }
                Event::Scalar(v, style, anchor, tag) => {
                    let plain = matches!(style, ScalarStyle::Plain);
                    // serde_saphyr leaves out a document that is null (an empty one too).
                    if !has_root && plain && tag.is_none() && is_null(&v) {
                        has_root = true;
                        continue;
                    }
                    let spelled = Spelled {
                        text: v.into_owned(),
                        line: span.start.line() as u64,
                        column: span.start.col() as u64 + 1,
                    };
                    (Node::Scalar { spelled, plain }, anchor, false)
                }
                Event::Alias(id) => (Node::Alias(anchors.get(&id).copied()), 0, false),
                Event::MappingStart(_, anchor, _) => (Node::Map(Vec::new()), anchor, true),
                Event::SequenceStart(_, anchor, _) => (Node::Seq(Vec::new()), anchor, true),
                Event::MappingEnd | Event::SequenceEnd => {
                    open.pop();
                    continue;
                }
                _ => continue,
            };
            let i = this.nodes.len();
            this.nodes.push(node);
            if anchor != 0 {
                anchors.insert(anchor, i);
            }
            match open.last_mut() {
                None if !has_root => {
                    has_root = true;
                    this.roots.push(i);
                }
                None => {}
                Some((parent, waiting)) => match (&mut this.nodes[*parent], waiting.take()) {
                    (Node::Map(entries), Some(key)) => entries.push((key, i)),
                    (Node::Map(_), None) => *waiting = Some(this.key_of(i)),
                    (Node::Seq(items), _) => items.push(i),
                    _ => {}
                },
            }
            if collection {
                open.push((i, None));
            }
        }
        this
    }

    /// A key's text: a scalar's, or the scalar an alias refers to.
    fn key_of(&self, i: usize) -> Option<String> {
        match &self.nodes[self.resolve(i)] {
            Node::Scalar { spelled, .. } => Some(spelled.text.clone()),
            _ => None,
        }
    }

    /// The node an alias stands for (any other node is itself).
    fn resolve(&self, i: usize) -> usize {
        match self.nodes[i] {
            Node::Alias(Some(to)) => to,
            _ => i,
        }
    }

    /// The plain scalar at `path` of document `doc`, as the typed reading meets it.
    fn get(&self, doc: usize, path: &[Seg]) -> Option<&Spelled> {
        let mut at = *self.roots.get(doc)?;
        for seg in path {
            at = self.child(at, seg, 0)?;
        }
        match &self.nodes[self.resolve(at)] {
            Node::Scalar {
                spelled,
                plain: true,
            } => Some(spelled),
            _ => None,
        }
    }

    /// The child `seg` of node `i`: a mapping's own key (the last of that name) before what
    /// its merge keys bring, those in order (`<<: [*a, *b]`: `a`'s before `b`'s).
    fn child(&self, i: usize, seg: &Seg, merges: usize) -> Option<usize> {
        match (&self.nodes[self.resolve(i)], seg) {
            (Node::Seq(items), Seg::Index(n)) => items.get(*n).copied(),
            (Node::Map(entries), Seg::Key(k)) => {
                let own = entries
                    .iter()
                    .rev()
                    .find(|(key, _)| key.as_ref() == Some(k));
                if let Some((_, v)) = own.filter(|_| k != "<<") {
                    return Some(*v);
                }
                if merges >= MERGE_DEPTH {
                    return None;
                }
                let merged = entries
                    .iter()
                    .filter(|(key, _)| key.as_deref() == Some("<<"));
                for (_, v) in merged {
                    let found = match &self.nodes[self.resolve(*v)] {
                        Node::Seq(items) => {
                            items.iter().find_map(|s| self.child(*s, seg, merges + 1))
                        }
                        _ => self.child(*v, seg, merges + 1),
                    };
                    if found.is_some() {
                        return found;
                    }
                }
                None
            }
            _ => None,
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

    /// A document's kind and apiVersion are checked where they stand: in a file of many
    /// documents the error names the line, the field and the resource (it said `0:0` and
    /// no resource, as it was raised after the document's mapping had been read).
    #[test]
    fn a_documents_kind_and_api_version_are_refused_where_they_stand() {
        let first = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: { name: a, namespace: shop }\nspec: { selector: { app: a }, ports: [{ name: http, port: 80 }] }\n---\n";
        let cases = [
            // The apiVersion first (as usual), then a kind it is not the version of.
            (
                "apiVersion: trellis.dev/v1\nkind: Service\nmetadata: { name: b, namespace: shop }\nspec: {}\n",
                (7, 7),
                "Service shop/b: kind: Service resources have apiVersion \"trellis.dev/v1alpha1\", not \"trellis.dev/v1\" (line 6)",
            ),
            // The kind first, then an apiVersion that is not its.
            (
                "kind: HTTPRoute\napiVersion: trellis.dev/v1alpha1\nmetadata: { name: b, namespace: shop }\nspec: {}\n",
                (7, 13),
                "HTTPRoute shop/b: apiVersion: HTTPRoute resources have apiVersion \"gateway.networking.k8s.io/v1\", not \"trellis.dev/v1alpha1\"",
            ),
            (
                "apiVersion: trellis.dev/v1alpha1\nkind: Servce\nmetadata: { name: b, namespace: shop }\nspec: {}\n",
                (7, 7),
                "Servce shop/b: kind: unknown kind \"Servce\", expected one of [\"Service\",",
            ),
            (
                "apiVersion: trellis.dev/v1alpha1\nmetadata: { name: b, namespace: shop }\nspec: {}\n",
                (8, 7),
                "document 2: spec: no `kind` before `spec`: a document names its kind first",
            ),
        ];
        for (second, (line, column), want) in cases {
            let text = format!("{first}{second}");
            match parse_documents("f.yaml", &text).unwrap_err() {
                ConfigError::Syntax {
                    line: l,
                    column: c,
                    message,
                    ..
                } => {
                    assert_eq!((l, c), (line, column), "{message}");
                    assert!(message.starts_with(want), "{message}\nwanted {want}");
                }
                e => panic!("not a syntax error: {e}"),
            }
        }
    }

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
            "agent:shop/w: spec.ports.http: 0 is not a port number 1-65535"
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
    fn many_scalars_to_mend_in_one_document_are_mended() {
        // A sequence's items are mended in one pass, so 5,000 of them are; and 1,000 labels.
        let hosts: Vec<String> = (0..5000).map(|i| format!("{i}.{i}0")).collect();
        let labels: Vec<String> = (0..1000).map(|i| format!("l{i}: {i}.0")).collect();
        let text = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: r, namespace: shop, labels: {{ {} }} }}\nspec:\n  parentRefs: [{{ kind: Service, name: a }}]\n  hostnames: [{}]\n  rules: []\n",
            labels.join(", "),
            hosts.join(", ")
        );
        let typed = parse_documents("f", &text).unwrap();
        let values = parse_values("f", &text).unwrap();
        let read = resource_from_json("f", &values[0]).expect("reads back");
        assert_eq!(read.metadata.labels, typed[0].metadata.labels);
        assert_eq!(read.metadata.labels["l7"], "7.0");
        assert_eq!(values[0]["spec"]["hostnames"][4999], "4999.49990");
    }

    #[test]
    fn spellings_are_as_large_as_the_file_however_much_aliases_repeat() {
        // Ten levels of ten aliases each: 10^10 scalars as the typed reading meets them.
        let mut text = "a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n".to_string();
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            text += &format!("a{i}: &a{i} [{refs}]\n");
        }
        let s = Spellings::of(&text);
        assert!(s.nodes.len() <= text.len(), "{} nodes", s.nodes.len());
        // Each is found, through every level.
        let mut at = vec![Seg::Key("a9".into())];
        at.extend((0..9).map(Seg::Index));
        at.push(Seg::Index(4));
        let found = s.get(0, &at).unwrap();
        assert_eq!(
            (found.text.as_str(), found.line, found.column),
            ("5", 1, 22)
        );
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
